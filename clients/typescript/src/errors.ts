/**
 * Errors of the evbus client.
 *
 * Every error the gateway answers is an RFC 9457 problem (`application/problem+json`):
 * {@link GatewayError} carries its `status`, `title`, `detail`, the extension members (for a
 * 422, `violations` and `violations_total`) and the `Retry-After` of a 429 or 503.
 */

/** One schema violation of a 422 answer: where (JSON pointer), which rule, and why. */
export interface Violation {
  pointer: string;
  keyword: string;
  message: string;
}

/** An RFC 9457 problem body as the gateway sends it. */
export interface Problem {
  type: string;
  title: string;
  status: number;
  detail: string;
  /** 422: at most 20 violations. */
  violations?: Violation[];
  /** 422: how many violations there were in all. */
  violations_total?: number;
  [extension: string]: unknown;
}

/** Base class of every error this package throws. */
export class EvbusError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "EvbusError";
  }
}

/** The gateway answered with an error status. */
export class GatewayError extends EvbusError {
  /** The HTTP status. */
  readonly status: number;
  /** The problem's title (the status reason, e.g. "Unprocessable Entity"). */
  readonly title: string;
  /** What was wrong, in words (never quotes the request). */
  readonly detail: string;
  /** The whole problem body (extension members included); a synthesised one if the body was not a problem. */
  readonly problem: Problem;
  /** `Retry-After` in seconds, when the gateway sent one (429, 503). */
  readonly retryAfter: number | undefined;

  constructor(problem: Problem, retryAfter?: number) {
    super(`evbus gateway: ${problem.status} ${problem.title}: ${problem.detail}`);
    this.name = "GatewayError";
    this.status = problem.status;
    this.title = problem.title;
    this.detail = problem.detail;
    this.problem = problem;
    this.retryAfter = retryAfter;
  }

  /** The schema violations of a 422 (empty otherwise). */
  get violations(): Violation[] {
    return this.problem.violations ?? [];
  }

  /** Whether the same request may succeed later (408, 429, 503, and other 5xx except 501). */
  get retryable(): boolean {
    return this.status === 408 || this.status === 429 || (this.status >= 500 && this.status !== 501);
  }
}

/** The gateway could not be reached, or the connection broke before an answer. */
export class ConnectionError extends EvbusError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "ConnectionError";
  }
}

/** Parses `Retry-After` (seconds or an HTTP date) into seconds; undefined if absent or malformed. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | undefined {
  if (value === null) return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const at = Date.parse(text);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, Math.ceil((at - now) / 1000));
}

/** Reads an error response into a {@link GatewayError}. */
export async function errorFromResponse(response: Response): Promise<GatewayError> {
  const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
  const contentType = response.headers.get("content-type") ?? "";
  let text = "";
  try {
    text = await response.text();
  } catch {
    // The body could not be read: the status still says what happened.
  }
  if (contentType.toLowerCase().startsWith("application/problem+json")) {
    try {
      const body = JSON.parse(text) as Partial<Problem>;
      if (body !== null && typeof body === "object") {
        const problem: Problem = {
          ...body,
          type: typeof body.type === "string" ? body.type : "about:blank",
          title: typeof body.title === "string" ? body.title : response.statusText,
          status: typeof body.status === "number" ? body.status : response.status,
          detail: typeof body.detail === "string" ? body.detail : "",
        };
        return new GatewayError(problem, retryAfter);
      }
    } catch {
      // Not JSON after all: fall through to the synthesised problem.
    }
  }
  const snippet = text.length > 200 ? `${text.slice(0, 200)}…` : text;
  return new GatewayError(
    {
      type: "about:blank",
      title: response.statusText || `HTTP ${response.status}`,
      status: response.status,
      detail: snippet === "" ? "(no problem body)" : `(not a problem body) ${snippet}`,
    },
    retryAfter,
  );
}
