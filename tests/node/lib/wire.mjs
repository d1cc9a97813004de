// The bytes parjobs signs and hashes, rebuilt from JSON alone.
//
// docs/security.md ("Signatures, for another language") and docs/messages.md ("Signed
// messages"): every signature is Ed25519 over
//     <purpose tag> NUL <RFC 8785 canonical JSON of the signed fields>
// where the signed fields are the message's full JSON form: every field of the schema, defaults
// included, money as a decimal string with six places, times in UTC written
// YYYY-MM-DDTHH:MM:SS[.ffffff]Z (six digits of fraction, or none when it is zero).
import canonicalize from 'canonicalize';
import { createHash, randomBytes } from 'node:crypto';

/** RFC 8785 (JCS) bytes of a JSON value. */
export function canonicalJson(value) {
  const text = canonicalize(value);
  if (text === undefined) throw new Error('this value has no canonical JSON');
  return Buffer.from(text, 'utf8');
}

/** What a signature of `purpose` signs: the tag, NUL, then the canonical JSON of `value`. */
export function signedBytes(purpose, value) {
  return Buffer.concat([Buffer.from(purpose, 'utf8'), Buffer.from([0]), canonicalJson(value)]);
}

export function sha256Hex(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}

/** A time as parjobs writes a UTC time: fraction of six digits, or none when it is zero. */
export function utcTime(date) {
  const iso = date.toISOString(); // YYYY-MM-DDTHH:MM:SS.mmmZ
  const millis = iso.slice(20, 23);
  return millis === '000' ? `${iso.slice(0, 19)}Z` : `${iso.slice(0, 19)}.${millis}000Z`;
}

/** Money as it travels: a decimal string with exactly six places ("1" -> "1.000000"). */
export function money(amount) {
  const match = /^(\d+)(?:\.(\d{1,6}))?$/.exec(String(amount).trim());
  if (!match) throw new Error(`${amount} is not an amount of at most six decimal places`);
  const units = match[1].replace(/^0+(?=\d)/, '');
  return `${units}.${(match[2] ?? '').padEnd(6, '0')}`;
}

/** 32 lower-case hex digits: message ids, nonces, cheque ids. */
export function newUid() {
  return randomBytes(16).toString('hex');
}

export const b64 = (bytes) => Buffer.from(bytes).toString('base64');
export const unb64 = (text) => Buffer.from(text, 'base64');
