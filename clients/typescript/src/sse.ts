/**
 * A Server-Sent Events parser, as the WHATWG HTML standard defines the format
 * (§9.2.6 "Interpreting an event stream"): lines end with CRLF, LF or CR; `data`, `event`,
 * `id` and `retry` fields; comments (`:` lines) are keep-alives; a blank line dispatches.
 */

/** One dispatched message. */
export interface SseMessage {
  /** The `event` field, or "message". */
  event: string;
  /** The `data` lines joined with "\n". */
  data: string;
  /** The last event id in force when this message was dispatched (may be ""). */
  lastEventId: string;
}

/** Incremental parser: feed it decoded text, get the messages whose blank line has arrived. */
export class SseParser {
  #buffer = "";
  #data: string[] = [];
  #event = "";
  #lastEventId = "";
  #dispatchedLastEventId = "";
  #sawCr = false;
  #started = false;
  /** The reconnection time the stream asked for with a `retry` field, in ms. */
  retry: number | undefined;

  /** The last event id in force (set by `id` fields, even of messages without data). */
  get lastEventId(): string {
    return this.#lastEventId;
  }

  /**
   * The last event id of the stream's position: the `lastEventId` in force when the last
   * blank line arrived, whether or not that message had data (the standard's "last event ID
   * string", the one a reconnection sends). "" until a message with an `id` is complete.
   */
  get dispatchedLastEventId(): string {
    return this.#dispatchedLastEventId;
  }

  /** Parses `chunk` (text) and returns the messages completed by it. */
  feed(chunk: string): SseMessage[] {
    if (chunk.length === 0) return [];
    if (!this.#started) {
      this.#started = true;
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
    }
    const out: SseMessage[] = [];
    let text = chunk;
    // A CR at the end of the previous chunk already ended its line: skip the LF of a CRLF.
    if (this.#sawCr && text.startsWith("\n")) text = text.slice(1);
    this.#sawCr = false;
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 0x0a && c !== 0x0d) continue;
      const line = this.#buffer + text.slice(start, i);
      this.#buffer = "";
      this.#line(line, out);
      if (c === 0x0d) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 0x0a) i++;
        } else {
          this.#sawCr = true;
        }
      }
      start = i + 1;
    }
    this.#buffer += text.slice(start);
    return out;
  }

  #line(line: string, out: SseMessage[]): void {
    if (line === "") {
      this.#dispatch(out);
      return;
    }
    if (line.startsWith(":")) return; // a comment: keep-alive
    const colon = line.indexOf(":");
    let field: string;
    let value: string;
    if (colon === -1) {
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
    }
    switch (field) {
      case "event":
        this.#event = value;
        break;
      case "data":
        this.#data.push(value);
        break;
      case "id":
        if (!value.includes("\0")) this.#lastEventId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        // Unknown fields are ignored (as the standard says).
        break;
    }
  }

  #dispatch(out: SseMessage[]): void {
    this.#dispatchedLastEventId = this.#lastEventId;
    if (this.#data.length === 0) {
      this.#event = "";
      return;
    }
    out.push({
      event: this.#event === "" ? "message" : this.#event,
      data: this.#data.join("\n"),
      lastEventId: this.#lastEventId,
    });
    this.#data = [];
    this.#event = "";
  }
}
