#!/usr/bin/env node
// A whole parjobs job from Node.js, written from the docs alone: docs/messages.md ("One job, as a
// client in any language does it"), docs/security.md, docs/pars.md, docs/payments.md and
// docs/asyncapi.json.
//
//   node tests/node/client.mjs --calculation checksum --input data.bin --max-spend 1 \
//       [--params '{"k": "v"}'] [--output DIR] [--amqp-url URL] [--key FILE] \
//       [--service-keys FILE] [--prefix P] [--lifetime-s N] [--timeout-s N]
//
// The AMQP URL, key file and service keys file default to PARJOBS_AMQP_URL, PARJOBS_KEY_FILE
// and PARJOBS_SERVICE_KEYS_FILE; the key file's passphrase is PARJOBS_KEY_PASSPHRASE.
// It signs and pays for the job, follows its verified events, uploads the input through the
// upload PAR, starts the run through the run PAR, waits for the end, downloads the outputs
// through a read PAR (each checked against the SHA-256 its completed event recorded) and prints
// one JSON line. Exit status: 0 completed, 2 refused (an error reply), 3 the job ended otherwise,
// 1 anything else. `--tamper request-signature` spoils the SubmitJob's signature after signing
// (to see the refusal).
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Broker, Refused } from './lib/broker.mjs';
import { JobEnded, JobFollower } from './lib/events.mjs';
import { loadKeyPair, loadServiceKeys } from './lib/keys.mjs';
import { authorise, jobRequest, signedEnvelope, writeCheque } from './lib/requests.mjs';
import { openPar, runCommand } from './lib/sealing.mjs';
import { downloadOutputs, upload } from './lib/transfer.mjs';
import { sha256Hex } from './lib/wire.mjs';

const warn = (message) => process.stderr.write(`parjobs-node: ${message}\n`);

function options() {
  const { values } = parseArgs({
    options: {
      'amqp-url': { type: 'string', default: process.env.PARJOBS_AMQP_URL },
      key: { type: 'string', default: process.env.PARJOBS_KEY_FILE },
      'service-keys': { type: 'string', default: process.env.PARJOBS_SERVICE_KEYS_FILE },
      prefix: { type: 'string', default: process.env.PARJOBS_PREFIX },
      calculation: { type: 'string' },
      params: { type: 'string', default: '{}' },
      input: { type: 'string' },
      'max-spend': { type: 'string' },
      output: { type: 'string' },
      'lifetime-s': { type: 'string' },
      'timeout-s': { type: 'string', default: '120' },
      tamper: { type: 'string' },
    },
  });
  for (const name of ['amqp-url', 'key', 'service-keys', 'calculation', 'input', 'max-spend']) {
    if (!values[name]) throw new Error(`--${name} is required (see the top of tests/node/client.mjs)`);
  }
  if (!process.env.PARJOBS_KEY_PASSPHRASE) throw new Error('set PARJOBS_KEY_PASSPHRASE to the key file\'s passphrase');
  if (values.tamper && values.tamper !== 'request-signature') throw new Error('--tamper takes only request-signature');
  return values;
}

/** Flip one bit of an envelope's signature: what a forger without the key would send. */
function tampered(envelope) {
  const signature = Buffer.from(envelope.signature.signature, 'base64');
  signature[0] ^= 1;
  return { ...envelope, signature: { ...envelope.signature, signature: signature.toString('base64') } };
}

async function main() {
  const opts = options();
  const me = loadKeyPair(opts.key, process.env.PARJOBS_KEY_PASSPHRASE);
  const serviceKeys = loadServiceKeys(opts['service-keys']);
  const input = readFileSync(opts.input);
  const deadline = Date.now() + Number(opts['timeout-s']) * 1000;

  // Events may come before the SubmitJob reply names the job: kept until then.
  let follower = null;
  const unclaimed = [];
  const onEvent = (event, source) => (follower ? follower.offer(event, source) : unclaimed.push([event, source]));
  const broker = await Broker.connect(opts['amqp-url'], { prefix: opts.prefix, serviceKeys, warn, onEvent });
  const ask = (service, body) => {
    const envelope = signedEnvelope(me, body);
    return broker.call(service, opts.tamper ? tampered(envelope) : envelope);
  };
  try {
    // 1. The signed, paid request (docs/payments.md; docs/messages.md "Bodies": submit_job).
    const request = jobRequest(opts.calculation, JSON.parse(opts.params), sha256Hex(input));
    const submit = {
      type: 'submit_job',
      request,
      authorisation: authorise(me, request),
      cheque: writeCheque(me, { payer: broker.name, maxSpend: opts['max-spend'], request }),
      lifetime_s: opts['lifetime-s'] ? Number(opts['lifetime-s']) : null,
    };
    const submitted = await ask('access', submit);
    const jobUid = submitted.sheet.job_uid;
    follower = new JobFollower(jobUid, serviceKeys, warn);
    // The events queue was bound before the submission: every event of the job reaches it.
    for (const [event, source] of unclaimed.splice(0)) follower.offer(event, source);
    const catchUp = async () => {
      const reply = await ask('access', { type: 'get_job', job_uid: jobUid, with_events: true });
      for (const event of reply.events) follower.offer(event, 'GetJob');
    };

    // 2. Wait (on events) until storage and compute have contracted.
    const waitFor = (type) => follower.waitFor(type, { deadline, catchUp });
    const storage = await waitFor('storage_contracted');
    const compute = await waitFor('compute_contracted');

    // 3. Upload through the upload PAR, start through the run PAR (docs/pars.md).
    await upload(await openPar(storage.payload.upload_par, me), input);
    const run = await openPar(compute.payload.run_par, me);
    const start = await runCommand('start', run.run_url, {
      jobUid, requester: me.fingerprint, compute: serviceKeys.compute[0],
    });
    const started = await ask('runs', start);
    if (!started.accepted) throw new Error(`compute did not accept the start: ${started.detail}`);

    // 4. Follow to the end; fetch the outputs through a read PAR, each checked.
    const end = await waitFor('completed');
    const { outputs, summary, cpu_seconds: cpuSeconds } = end.payload;
    const readPar = end.payload.read_par ?? (await ask('access', { type: 'get_outputs', job_uid: jobUid })).read_par;
    const { manifest } = await openPar(readPar, me);
    await downloadOutputs(manifest, outputs, opts.output);
    return {
      ok: true,
      job_uid: jobUid,
      state: 'completed',
      events: follower.events.map((event) => event.payload.type),
      outputs,
      summary,
      cpu_seconds: cpuSeconds,
      output_dir: opts.output ?? null,
    };
  } finally {
    await broker.close();
  }
}

main().then(
  (result) => {
    process.stdout.write(`${JSON.stringify(result)}\n`);
  },
  (error) => {
    const status = error instanceof Refused ? 2 : error instanceof JobEnded ? 3 : 1;
    const code = error.code ?? (status === 3 ? 'job.ended' : 'error');
    process.stdout.write(`${JSON.stringify({ ok: false, error: code, message: error.message })}\n`);
    warn(`failed: ${error.message}`);
    process.exitCode = status;
  },
);
