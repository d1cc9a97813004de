// One job's events, each checked before use (docs/security.md, "Sealed, chained events" and
// "What the client enforces"; docs/messages.md, "Events").
//
// An event is used only if it is signed by a service role allowed to emit its type (Ed25519 over
// "parjobs-event-v1" NUL RFC 8785 JSON of the event less `signature`, against the operator's
// service keys) and chained to the event before it (`prev_hash` = SHA-256 hex of the canonical
// JSON of the whole previous event; null for event 1). Events are applied in seq order: a copy
// is dropped, one that comes early is held until the gap is filled.
import { verifies } from './keys.mjs';
import { canonicalJson, sha256Hex, signedBytes, unb64 } from './wire.mjs';

export const EMITTERS = {
  submitted: ['access'],
  storage_contracted: ['storage'],
  compute_contracted: ['compute'],
  run_started: ['compute'],
  progress: ['compute'],
  completed: ['compute'],
  failed: ['compute'],
  cancelled: ['compute', 'access'],
  expired: ['access'],
};
export const TERMINAL = new Set(['completed', 'failed', 'cancelled', 'expired']);

/** Why `event` is not sealed by a role allowed to emit it, or null if it is. An event type this
 * client does not know (a newer one) must still carry a valid service signature. */
export function sealProblem(event, serviceKeys) {
  const { signature, ...signedPart } = event;
  if (!event.signer || !signature) return 'it carries no signature';
  const keys = serviceKeys[event.signer];
  if (!keys) return `its signer ${event.signer} is no service role`;
  const data = signedBytes('parjobs-event-v1', signedPart);
  if (!keys.some((key) => verifies(key, data, unb64(signature)))) {
    return `its signature does not verify against the ${event.signer} keys`;
  }
  const allowed = EMITTERS[event.payload?.type];
  if (allowed && !allowed.includes(event.signer)) {
    return `${event.signer} may not emit ${event.payload.type} events`;
  }
  return null;
}

export const eventHash = (event) => sha256Hex(canonicalJson(event));

/** The job ended without the event waited for. */
export class JobEnded extends Error {}

export class JobFollower {
  constructor(jobUid, serviceKeys, warn) {
    this.jobUid = jobUid;
    this.serviceKeys = serviceKeys;
    this.warn = warn;
    this.events = []; // applied: verified and chained, seq 1..n
    this.early = new Map(); // verified, waiting for the event before them
    this.waiters = new Set();
  }

  get last() { return this.events.at(-1); }
  get ended() { return this.last !== undefined && TERMINAL.has(this.last.payload.type); }
  get hasGap() { return this.early.size > 0; }

  offer(event, source) {
    if (event.job_uid !== this.jobUid) return;
    const problem = sealProblem(event, this.serviceKeys);
    if (problem) {
      this.warn(`dropped event ${event.seq} from ${source}: ${problem}`);
      return;
    }
    if (event.seq <= this.events.length) return; // a copy (published at least once)
    if (event.seq > this.events.length + 1) {
      this.early.set(event.seq, event);
      this.notify();
      return;
    }
    let next = event;
    while (next && this.apply(next, source)) {
      next = this.early.get(this.events.length + 1);
      this.early.delete(this.events.length + 1);
    }
    for (const seq of this.early.keys()) if (seq <= this.events.length) this.early.delete(seq);
    this.notify();
  }

  apply(event, source) {
    const link = this.last === undefined ? null : eventHash(this.last);
    if (event.prev_hash !== link) {
      this.warn(`dropped event ${event.seq} from ${source}: not chained to the event before it`);
      return false;
    }
    if (this.ended) {
      this.warn(`dropped event ${event.seq} from ${source}: the job has already ended`);
      return false;
    }
    this.events.push(event);
    return true;
  }

  /** The job's first event of `type`, once applied; JobEnded if the job ends without it. An
   * event that comes early shows a gap: `catchUp` (one GetJob) is asked once per gap. */
  async waitFor(type, { deadline, catchUp }) {
    let filledAt = -1;
    for (;;) {
      const found = this.events.find((event) => event.payload.type === type);
      if (found) return found;
      if (this.ended) {
        const { type: end, reason } = this.last.payload;
        throw new JobEnded(`job ${this.jobUid} ended ${end} before ${type}${reason ? `: ${reason}` : ''}`);
      }
      if (this.hasGap && filledAt !== this.events.length) {
        filledAt = this.events.length;
        await catchUp();
        continue;
      }
      if (Date.now() > deadline) throw new Error(`job ${this.jobUid}: no ${type} event in time (--timeout-s)`);
      await this.changed(Math.min(1000, Math.max(0, deadline - Date.now())));
    }
  }

  notify() {
    for (const wake of this.waiters) wake();
  }

  /** Resolves on the next change (an event applied, or a gap opened), or after `ms`. */
  changed(ms) {
    return new Promise((resolve) => {
      const wake = () => { clearTimeout(timer); this.waiters.delete(wake); resolve(true); };
      const timer = setTimeout(() => { this.waiters.delete(wake); resolve(false); }, ms);
      this.waiters.add(wake);
    });
  }
}
