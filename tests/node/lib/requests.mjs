// What a user signs: the job request's authorisation and cheque (docs/payments.md), and every
// request's envelope (docs/security.md, "Signatures, for another language"; docs/messages.md,
// "The envelope").
import { b64, canonicalJson, money, newUid, sha256Hex, signedBytes, utcTime } from './wire.mjs';

const CHEQUE_LIFETIME_MS = 3600_000;

/** A JobRequest with every field (the defaults are part of what is signed). */
export function jobRequest(calculation, parameters = {}, inputSha256 = null) {
  return { calculation, parameters, input_sha256: inputSha256 };
}

/** SHA-256 (hex) of the request's canonical JSON: what authorisations and cheques name. */
export function requestFingerprint(request) {
  return sha256Hex(canonicalJson(request));
}

function signed(purpose, draft, me) {
  return { ...draft, signature: b64(me.sign(signedBytes(purpose, draft))) };
}

/** The user's signed "run this request for me" (docs/payments.md, "Authorisation"). */
export function authorise(me, request, now = new Date()) {
  return signed('parjobs-authorisation-v1', {
    schema_version: 1,
    user: me.fingerprint,
    request_fingerprint: requestFingerprint(request),
    timestamp: utcTime(now),
    nonce: newUid(),
  }, me);
}

/** A cheque from `payer` (the user's account) to access, for this request only
 * (docs/payments.md, "Cheques"). */
export function writeCheque(me, { payer, maxSpend, request, now = new Date() }) {
  return signed('parjobs-cheque-v1', {
    schema_version: 1,
    cheque_id: newUid(),
    payer,
    payer_key: me.fingerprint,
    recipient: 'access',
    max_spend: money(maxSpend),
    resource: requestFingerprint(request),
    expires_at: utcTime(new Date(now.getTime() + CHEQUE_LIFETIME_MS)),
  }, me);
}

/** The bytes a message signature signs: message id, time, nonce, signer and body. */
export function messageBytes({ message_id, sent_at, body }, { signer, nonce }) {
  return signedBytes('parjobs-message-v1', { message_id, sent_at, nonce, signer, body });
}

/** An envelope carrying `body`, signed by the user (signer: their key's fingerprint). */
export function signedEnvelope(me, body, { sender = 'node-client', now = new Date() } = {}) {
  const envelope = { schema_version: 1, message_id: newUid(), sent_at: utcTime(now), sender, body };
  const signature = { schema_version: 1, signer: me.fingerprint, nonce: newUid() };
  signature.signature = b64(me.sign(messageBytes(envelope, signature)));
  return { ...envelope, signature };
}
