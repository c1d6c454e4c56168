// The SSE parser against the event-stream format of the HTML standard, including chunks cut
// anywhere (the network decides where a read ends).

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { SseParser, type SseMessage } from "../src/index.js";

function parse(chunks: string[]): { messages: SseMessage[]; parser: SseParser } {
  const parser = new SseParser();
  const messages = chunks.flatMap((c) => parser.feed(c));
  return { messages, parser };
}

const stream = "\uFEFF: keep-alive\r\nid: a1\r\nevent: afterOrderCreate\r\ndata: {\"n\":1}\r\n\r\nid: a2\ndata: line one\ndata:line two\n\n:comment\rid: a3\rdata\r\r";

describe("SseParser", () => {
  test("fields, comments, CRLF/LF/CR line ends, a BOM, multi-line data", () => {
    const { messages } = parse([stream]);
    assert.deepEqual(messages, [
      { event: "afterOrderCreate", data: '{"n":1}', lastEventId: "a1" },
      { event: "message", data: "line one\nline two", lastEventId: "a2" },
      { event: "message", data: "", lastEventId: "a3" },
    ]);
  });

  test("the same messages whatever the chunk boundaries (every split point, CRLF cut included)", () => {
    const whole = parse([stream]).messages;
    for (let i = 0; i <= stream.length; i++) {
      for (const j of [i, Math.min(stream.length, i + 1), Math.min(stream.length, i + 7)]) {
        const { messages } = parse([stream.slice(0, i), stream.slice(i, j), stream.slice(j)]);
        assert.deepEqual(messages, whole, `split at ${i} and ${j}`);
      }
    }
  });

  test("an unfinished message is not dispatched; an id without data still moves the last id", () => {
    const { messages, parser } = parse(["id: x1\n\n", "id: x2\ndata: partial"]);
    assert.deepEqual(messages, []);
    assert.equal(parser.lastEventId, "x2");
    // The position is the id in force at the last blank line: x1, not the unfinished x2.
    assert.equal(parser.dispatchedLastEventId, "x1");
  });

  test("retry takes digits only; unknown fields and ids with NUL are ignored", () => {
    const { messages, parser } = parse(["retry: 1500\nretry: 2s\nfoo: bar\nid: a\u0000b\nid: ok\ndata: d\n\n"]);
    assert.equal(parser.retry, 1500);
    assert.deepEqual(messages, [{ event: "message", data: "d", lastEventId: "ok" }]);
  });
});
