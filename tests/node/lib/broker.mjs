// The user's connection to parjobs over RabbitMQ (docs/messages.md, "Exchanges and queues" and
// "Request and reply"; docs/asyncapi.json, operations user.send.* and user.receive.client.events).
//
// The user connects as their own broker user, `user:<name>@<domain>` (<domain>: the deployment's
// prefix, dots written as `:`), declares two exclusive classic queues of their own,
// `<prefix>.client.<username>.reply.<id>` and `<prefix>.client.<username>.events.<id>` (the
// latter bound to `<prefix>.events` with `job.<username>.#`), and publishes requests to the
// `<prefix>.commands` exchange with routing key `rpc.<service>`: persistent, mandatory,
// confirmed, with reply_to, correlation_id, message_id and user_id (which RabbitMQ checks).
// A reply is used only if its envelope is signed by the role the request went to.
import amqp from 'amqplib';
import { randomUUID } from 'node:crypto';
import { verifies } from './keys.mjs';
import { messageBytes } from './requests.mjs';
import { unb64 } from './wire.mjs';

const REPLY_WINDOW_MS = 5 * 60_000;
/** Each RPC service -> the role whose signature its replies carry. */
const SIGNER_OF = { access: 'access', compute: 'compute', runs: 'compute' };

export class Refused extends Error {
  constructor(service, reply) {
    super(`${service} refused the request: ${reply.code}: ${reply.message}`);
    this.code = reply.code;
  }
}

/** The registered user's broker username, name and the deployment prefix, from their URL. */
export function identity(amqpUrl) {
  const username = decodeURIComponent(new URL(amqpUrl).username);
  const match = /^user:([^@]+)@(.+)$/.exec(username);
  if (!match) throw new Error(`broker user ${username} is not a registered user's (user:<name>@<domain>)`);
  return { username, name: match[1].replaceAll(':', '.'), prefix: match[2].replaceAll(':', '.') };
}

export class Broker {
  static async connect(amqpUrl, { prefix, serviceKeys, warn, onEvent }) {
    const who = identity(amqpUrl);
    let connection;
    try {
      connection = await amqp.connect(amqpUrl, {
        clientProperties: { connection_name: `parjobs-node-client-${who.name}` },
      });
    } catch (error) {
      const { host } = new URL(amqpUrl);
      throw new Error(`cannot connect to RabbitMQ at ${host} as ${who.username}: ${error.message}`);
    }
    // What fails on the connection fails the operation waiting on it; this only keeps an
    // 'error' event from ending the process before that operation says what went wrong.
    connection.on('error', (error) => warn(`connection: ${error.message}`));
    const broker = new Broker(connection, { ...who, prefix: prefix ?? who.prefix }, serviceKeys, warn);
    await broker.start(onEvent);
    return broker;
  }

  constructor(connection, who, serviceKeys, warn) {
    Object.assign(this, who);
    this.connection = connection;
    this.serviceKeys = serviceKeys;
    this.warn = warn;
    this.pending = new Map(); // correlation id -> {role, resolve}
    this.returned = new Set(); // message ids RabbitMQ returned as unroutable
  }

  async start(onEvent) {
    this.channel = await this.connection.createConfirmChannel();
    this.channel.on('error', (error) => this.warn(`channel: ${error.message}`));
    this.channel.on('return', (message) => this.returned.add(message.properties.messageId));
    const instance = randomUUID().replaceAll('-', '');
    const namespace = `${this.prefix}.client.${this.username}`;
    const queue = { durable: false, exclusive: true, arguments: { 'x-queue-type': 'classic' } };
    this.replyQueue = (await this.channel.assertQueue(`${namespace}.reply.${instance}`, queue)).queue;
    const events = (await this.channel.assertQueue(`${namespace}.events.${instance}`, queue)).queue;
    await this.channel.bindQueue(events, `${this.prefix}.events`, `job.${this.username}.#`);
    await this.channel.consume(this.replyQueue, (message) => this.onReply(message), { noAck: true });
    await this.channel.consume(events, (message) => {
      this.channel.ack(message);
      let envelope;
      try {
        envelope = JSON.parse(message.content.toString('utf8'));
      } catch {
        this.warn(`dropped a message on the events queue that is not JSON`);
        return;
      }
      // Other bodies (a newer kind of message) are not events of the log: ignored.
      if (envelope?.body?.type === 'event') onEvent(envelope.body.event, 'the events queue');
    });
  }

  /** Send `envelope` to `service` (access, compute or runs); its verified reply's body. */
  async call(service, envelope, { timeoutMs = 60_000 } = {}) {
    const correlationId = randomUUID().replaceAll('-', '');
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(correlationId);
        reject(new Error(`no reply signed by ${SIGNER_OF[service]} within ${timeoutMs / 1000} s to ${envelope.body.type}`));
      }, timeoutMs);
      this.pending.set(correlationId, {
        role: SIGNER_OF[service],
        resolve: (body) => { clearTimeout(timer); this.pending.delete(correlationId); resolve(body); },
      });
    });
    await this.publish(service, envelope, correlationId);
    const body = await reply;
    if (body.type === 'error') throw new Refused(service, body);
    return body;
  }

  async publish(service, envelope, correlationId) {
    const messageId = envelope.message_id;
    const content = Buffer.from(JSON.stringify(envelope), 'utf8');
    await new Promise((resolve, reject) => {
      this.channel.publish(`${this.prefix}.commands`, `rpc.${service}`, content, {
        contentType: 'application/json',
        deliveryMode: 2,
        mandatory: true,
        messageId,
        correlationId,
        replyTo: this.replyQueue,
        userId: this.username,
        timestamp: Math.floor(Date.now() / 1000),
        appId: 'parjobs-node-client',
      }, (error) => (error ? reject(new Error(`RabbitMQ refused the request: ${error}`)) : resolve()));
    });
    if (this.returned.delete(messageId)) {
      throw new Error(`no queue is bound to rpc.${service} on ${this.prefix}.commands: is parjobs running?`);
    }
  }

  onReply(message) {
    const pending = this.pending.get(message.properties.correlationId);
    if (!pending) return;
    const problem = this.replyProblem(message.content, pending.role);
    if (problem.reason) {
      // Anything else that comes with the correlation id is dropped; the genuine reply may follow.
      this.warn(`dropped a reply from broker user ${message.properties.userId}: ${problem.reason}`);
      return;
    }
    pending.resolve(problem.body);
  }

  replyProblem(content, role) {
    let envelope;
    try {
      envelope = JSON.parse(content.toString('utf8'));
    } catch {
      return { reason: 'it is not JSON' };
    }
    const signature = envelope?.signature;
    if (!signature || signature.signer !== role) return { reason: `it is not signed by ${role}` };
    const data = messageBytes(envelope, signature);
    if (!this.serviceKeys[role].some((key) => verifies(key, data, unb64(signature.signature)))) {
      return { reason: `its signature does not verify against the ${role} keys` };
    }
    if (Math.abs(Date.parse(envelope.sent_at) - Date.now()) > REPLY_WINDOW_MS) {
      return { reason: 'its signed time is more than 5 minutes from this clock' };
    }
    return { body: envelope.body };
  }

  async close() {
    try {
      await this.connection.close();
    } catch {
      // already closed (by the broker, with the error that ended the run)
    }
  }
}
