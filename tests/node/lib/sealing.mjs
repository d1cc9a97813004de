// What travels sealed: PAR capabilities (docs/pars.md, "Sealing") and run commands
// (docs/security.md, "Signatures, for another language", and "Sealed run commands").
//
// Sealing is HPKE (RFC 9180) base mode, single shot: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
// AES-256-GCM, empty AAD; the sealed bytes are the 32-byte encapsulated key followed by the
// ciphertext and its tag. The `info` binds what the seal is for.
import { Aes256Gcm, CipherSuite, HkdfSha256 } from '@hpke/core';
import { DhkemX25519HkdfSha256 } from '@hpke/dhkem-x25519';
import { sha256Hex, signedBytes, unb64 } from './wire.mjs';

const suite = new CipherSuite({
  kem: new DhkemX25519HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes256Gcm(),
});
const ENC_BYTES = 32;
const arrayBuffer = (bytes) => Uint8Array.from(bytes).buffer;

export async function seal(plaintext, recipientX25519, info) {
  const recipientPublicKey = await suite.kem.importKey('raw', arrayBuffer(recipientX25519), true);
  const { enc, ct } = await suite.seal({ recipientPublicKey, info }, plaintext);
  return Buffer.concat([Buffer.from(enc), Buffer.from(ct)]);
}

export async function open(sealed, x25519Private, info) {
  const recipientKey = await suite.kem.importKey('raw', arrayBuffer(x25519Private), false);
  const enc = arrayBuffer(sealed.subarray(0, ENC_BYTES));
  try {
    return Buffer.from(await suite.open({ recipientKey, enc, info }, sealed.subarray(ENC_BYTES)));
  } catch {
    throw new Error('the sealed payload does not open: it, or what is bound to it, was changed');
  }
}

// PARData's fields in schema order (docs/asyncapi.json, components.schemas.PARData).
const PAR_FIELDS = [
  'schema_version', 'uid', 'kind', 'is_readable', 'is_writeable', 'is_executable', 'key',
  'prefix', 'resource', 'max_size', 'min_size', 'sha256', 'issuer', 'recipient', 'created_at',
  'expires_at',
];

/** The HPKE info of a PAR's capability (docs/pars.md, "Sealing"):
 * `parjobs-par-v1|<kind>|<permission letters>|<uid>|<SHA-256 hex of the PAR's JSON less sealed>`,
 * that JSON being compact, with the fields in schema order and the values as they travel. */
export function parSealingInfo(par) {
  const clear = Object.fromEntries(PAR_FIELDS.map((field) => [field, par[field]]));
  const letters = ['r', 'w', 'x'].filter(
    (_, i) => [par.is_readable, par.is_writeable, par.is_executable][i],
  ).join('');
  const digest = sha256Hex(Buffer.from(JSON.stringify(clear), 'utf8'));
  return Buffer.from(`parjobs-par-v1|${par.kind}|${letters}|${par.uid}|${digest}`, 'utf8');
}

const EXPIRY_BUFFER_MS = 30_000;

/** The capability inside a PAR sealed for `me` (docs/pars.md): its presigned URLs or run URL. */
export async function openPar(par, me, now = new Date()) {
  if (par.recipient !== me.fingerprint) {
    throw new Error(`PAR ${par.uid} is sealed for key ${par.recipient.slice(0, 16)}…, not for this one`);
  }
  if (Date.parse(par.expires_at) - now.getTime() <= EXPIRY_BUFFER_MS) {
    throw new Error(`PAR ${par.uid} expired (or is within 30 s of expiry) at ${par.expires_at}`);
  }
  try {
    const plaintext = await open(unb64(par.sealed), me.x25519Private, parSealingInfo(par));
    return JSON.parse(plaintext.toString('utf8'));
  } catch (error) {
    throw new Error(`${par.kind} PAR ${par.uid}: ${error.message}`);
  }
}

/** The body of a run command (start_run, stop_run, get_run_status): the run URL sealed for
 * compute's current X25519 key, the info binding the action, the job and the requester. */
export async function runCommand(action, runUrl, { jobUid, requester, compute }) {
  const info = signedBytes('parjobs-run-command-v1', { action, job_uid: jobUid, requester });
  const sealed = await seal(Buffer.from(runUrl, 'utf8'), compute.x25519, info);
  const type = { start: 'start_run', stop: 'stop_run', status: 'get_run_status' }[action];
  return { type, job_uid: jobUid, sealed: sealed.toString('base64') };
}
