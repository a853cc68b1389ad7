// safe_fast inspector: a browser client of the SAFE realtime protocol, then the page around it.
//
// The client (InspectorClient) is the browser twin of the Python client's
// state machine (safe_fast/client/_state.py); read that module's essay for
// the reasons. The same pieces are here, in the same words:
//
// * The connection machine: idle -> connecting -> open -> reconnecting ->
//   closed. A run starts with connect(); if its first connection cannot be
//   made the run ends (closed) instead of retrying behind the user's back.
//   close() is sticky: the page makes a new client to connect again.
// * The close-code policy: 4001 resumes at once, 4002 stops (a typed token
//   will not get better), 4003 drops the subscription that caused it and
//   resumes at once, 4004 is reported and retried with backoff, any other
//   code retries with backoff. "At once" only for the first failure of a
//   streak; the attempt counter resets after 5 s of stable connection.
// * Backoff: attempt n waits min(0.5 * 2^n, 30) s, +/- 20 % jitter.
// * Requests (propose, ping) get correlation ids c-1, c-2, ...; made while not
//   open they wait in a FIFO queue (at most 100), sent after the resubscribes
//   of the next open; in flight when the connection drops, they fail with
//   "connection closed: <code> <reason>" and are never sent again. Each times
//   out 30 s after the call.
// * Subscriptions live across connections and resubscribe with since =
//   their cursor. The state frame sets the cursor to its lastTransactionId,
//   live transactions advance it, replayed ones never move it, lifecycle
//   removed drops the subscription.
//
// What a browser changes: a refused WebSocket upgrade (HTTP 401) reaches the
// script only as a close with code 1006. So each connection attempt first
// asks for the ShareData listing with the same token; the server guards it
// with the same authenticate, and its 401 is the attempt's 401 (it also
// refreshes the list of ids). A network failure there is a failed attempt.
//
// The page renders at most once per animation frame: events only change the
// model and ask for a frame, so a burst of transactions costs one render.

const IDLE = "idle";
const CONNECTING = "connecting";
const OPEN = "open";
const RECONNECTING = "reconnecting";
const CLOSED = "closed";

export const DEFAULT_BACKOFF = Object.freeze({ min: 0.5, max: 30, factor: 2, jitter: 0.2 });

/** Seconds before reconnect attempt `attempt` (from 0), as next_backoff_delay. */
export function nextBackoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const n = Math.max(0, attempt);
  const base = Math.min(backoff.min * backoff.factor ** n, backoff.max);
  return Math.max(0, base + base * backoff.jitter * (random() * 2 - 1));
}

export const CLOSE_MEANINGS = Object.freeze({
  1000: "normal closure",
  1001: "going away: the server is shutting down",
  1005: "closed without a status code",
  1006: "connection lost without a close frame: the server is gone or unreachable",
  1007: "invalid UTF-8 in a text frame",
  1008: "policy violation",
  1009: "message too big for the server",
  1011: "internal server error",
  4001: "fell behind: the page did not read fast enough; resuming from the cursor",
  4002: "unauthorized: the credentials were rejected or have expired",
  4003: "unknown shareDataId: the server has no such ShareData",
  4004: "invalid message: the server could not parse a frame from this page",
});

export function describeClose(code, reason) {
  const meaning = CLOSE_MEANINGS[code] || "closed";
  return `${code} ${meaning}${reason ? ` (${reason})` : ""}`;
}

const CLOSE_POLICIES = {
  4001: { name: "resume", immediate: true },
  4002: { name: "unauthorized", unauthorized: true },
  4003: { name: "drop-subscription", immediate: true, dropSubscription: true },
  4004: { name: "report", report: true },
};
const DEFAULT_CLOSE_POLICY = { name: "backoff" };

export const UNAUTHORIZED_MESSAGE =
  "401 Unauthorized: the server refused the token (missing, expired, or not signed by an issuer it trusts). " +
  "Enter a valid token and press Connect.";

/** An error with a `kind`: connection-failed, unauthorized, connection-closed, subscription-rejected, server-error, protocol-error, request. */
export class RealtimeError extends Error {
  constructor(kind, message, details = {}) {
    super(message);
    this.kind = kind;
    Object.assign(this, details);
  }
}

const UNKNOWN_PREFIX = "shareDataId ";
const UNKNOWN_SUFFIX = " not found";
const UNAUTHORIZED_PREFIX = "not authorized to subscribe to ";

export class InspectorClient {
  /**
   * websocketUrl / listingUrl: absolute URLs without the token; token: "" for none;
   * emit(name, ...args): "state", "listing", "open", "close", "reconnecting", "error", "frame".
   */
  constructor({ websocketUrl, listingUrl, token = "", emit, maxQueueSize = 100, requestTimeout = 30, stableAfter = 5 }) {
    this.websocketUrl = websocketUrl;
    this.listingUrl = listingUrl;
    this.token = token;
    this.emit = emit;
    this.maxQueueSize = maxQueueSize;
    this.requestTimeout = requestTimeout;
    this.stableAfter = stableAfter;
    this.state = IDLE;
    this.attempt = 0;
    this.closedByUser = false;
    this.everOpened = false;
    this.openedAt = null;
    this.nextId = 1;
    this.queue = [];
    this.inFlight = new Map();
    this.abandoned = new Set(); // timed out: a late answer is expected, not an error
    this.subscriptions = new Map(); // id -> { id, cursor }
    // Per connection: subscribes sent and not answered yet, in send order.
    this.awaitingState = new Map();
    this.unsubscribed = new Set();
    this.culpritDropped = false;
    this.socket = null;
    this.timer = null;
    this.generation = 0; // bumps per attempt: callbacks of an older one are ignored
  }

  // -- the connection machine ----------------------------------------------------------

  connect() {
    if (this.closedByUser) throw new RealtimeError("closed", "client is closed");
    if (this.state !== IDLE && this.state !== CLOSED) return;
    this.everOpened = false;
    this.attempt = 0;
    this.setState(CONNECTING);
    this.startAttempt();
  }

  close() {
    if (this.closedByUser) return;
    this.closedByUser = true;
    this.generation += 1;
    clearTimeout(this.timer);
    for (const request of [...this.inFlight.values()]) this.settle(request, null, new RealtimeError("closed", "client closed"));
    this.stop(new RealtimeError("closed", "client closed"));
    if (this.socket) {
      this.socket.close(1000, "inspector disconnected");
      this.socket = null;
    }
  }

  setState(state, detail = "") {
    this.state = state;
    this.emit("state", state, detail);
  }

  async startAttempt() {
    const generation = ++this.generation;
    try {
      const listing = await this.fetchListing();
      if (generation !== this.generation) return;
      this.emit("listing", listing);
    } catch (error) {
      if (generation === this.generation) this.attemptFailed(error);
      return;
    }
    let socket;
    try {
      socket = new WebSocket(this.withToken(this.websocketUrl));
    } catch (error) {
      this.attemptFailed(new RealtimeError("connection-failed", `cannot open the WebSocket: ${error.message}`));
      return;
    }
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      if (generation !== this.generation) return socket.close(1000);
      opened = true;
      this.opened();
    };
    socket.onmessage = (event) => {
      if (generation === this.generation) this.receive(event.data);
    };
    socket.onclose = (event) => {
      if (generation !== this.generation) return;
      this.socket = null;
      if (opened) this.connectionLost(event.code, event.reason);
      else this.attemptFailed(new RealtimeError("connection-failed", `the WebSocket closed before opening: ${describeClose(event.code, event.reason)}`));
    };
  }

  /** The listing, or null when the server cannot list (501); throws a classified failure. */
  async fetchListing() {
    let response;
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 10_000);
    try {
      response = await fetch(this.withToken(this.listingUrl), { cache: "no-store", signal: abort.signal });
    } catch (error) {
      throw new RealtimeError("connection-failed", `server unreachable (${error.message})`);
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 401) throw new RealtimeError("unauthorized", UNAUTHORIZED_MESSAGE, { status: 401 });
    if (response.status === 501) return null;
    if (!response.ok) throw new RealtimeError("connection-failed", `the server answered HTTP ${response.status}`, { status: response.status });
    const body = await response.json();
    return Array.isArray(body.shareData) ? body.shareData : [];
  }

  withToken(url) {
    if (!this.token) return url;
    return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(this.token)}`;
  }

  opened() {
    if (this.state !== CONNECTING && this.state !== RECONNECTING) return;
    this.everOpened = true;
    this.openedAt = performance.now() / 1000;
    this.awaitingState.clear();
    this.unsubscribed.clear();
    this.abandoned.clear();
    this.culpritDropped = false;
    this.state = OPEN;
    for (const subscription of this.subscriptions.values()) this.sendSubscribe(subscription);
    const queued = this.queue;
    this.queue = [];
    for (const request of queued) this.sendRequest(request);
    this.setState(OPEN);
    this.emit("open");
  }

  connectionLost(code, reason) {
    const now = performance.now() / 1000;
    for (const request of [...this.inFlight.values()]) {
      this.settle(request, null, new RealtimeError("connection-closed", `connection closed: ${code} ${reason}`.trim(), { code }));
    }
    const awaiting = [...this.awaitingState.keys()];
    const culpritDropped = this.culpritDropped;
    this.awaitingState.clear();
    this.unsubscribed.clear();
    this.culpritDropped = false;
    this.emit("close", code, reason);
    if (this.closedByUser) return;
    if (this.openedAt !== null && now - this.openedAt >= this.stableAfter) this.attempt = 0;
    this.openedAt = null;
    const policy = CLOSE_POLICIES[code] || DEFAULT_CLOSE_POLICY;
    let immediate = Boolean(policy.immediate);
    if (policy.dropSubscription && !culpritDropped) {
      const culprit = awaiting[0];
      if (culprit === undefined) immediate = false;
      else if (this.subscriptions.has(culprit)) this.reject(culprit, "unknown-share-data", `shareDataId ${culprit} not found`);
    }
    if (policy.report) this.emit("error", new RealtimeError("connection-closed", `connection closed: ${describeClose(code, reason)}`, { code }));
    if (policy.unauthorized) {
      const error = new RealtimeError("unauthorized", `connection closed: ${describeClose(code, reason)}`, { code });
      this.emit("error", error);
      this.stop(error);
      return;
    }
    this.schedule(immediate, describeClose(code, reason));
  }

  attemptFailed(error) {
    if (this.closedByUser) return;
    if (!this.everOpened || error.kind === "unauthorized") {
      // The first connection of a run, or a refused token: the run ends.
      this.emit("error", error);
      this.stop(error);
      return;
    }
    this.emit("error", error);
    this.schedule(false, error.message);
  }

  schedule(immediate, why) {
    const delay = immediate && this.attempt === 0 ? 0 : nextBackoffDelay(this.attempt);
    this.attempt += 1;
    this.setState(RECONNECTING, `attempt ${this.attempt} in ${delay.toFixed(1)} s, after ${why}`);
    this.emit("reconnecting", this.attempt, delay);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.startAttempt(), delay * 1000);
  }

  stop(error) {
    this.everOpened = false;
    this.attempt = 0;
    this.openedAt = null;
    const queued = this.queue;
    this.queue = [];
    for (const request of queued) this.settle(request, null, error);
    this.subscriptions.clear();
    this.awaitingState.clear();
    this.setState(CLOSED, error.message);
  }

  // -- subscriptions ------------------------------------------------------------------

  subscribe(shareDataId) {
    if (this.closedByUser) throw new RealtimeError("closed", "client is closed");
    let subscription = this.subscriptions.get(shareDataId);
    if (subscription) return subscription;
    subscription = { id: shareDataId, cursor: null };
    this.subscriptions.set(shareDataId, subscription);
    if (this.state === OPEN) this.sendSubscribe(subscription);
    return subscription;
  }

  unsubscribe(shareDataId) {
    if (!this.subscriptions.delete(shareDataId)) return;
    if (this.state === OPEN) {
      this.send({ v: 1, type: "unsubscribe", shareDataId });
      // Frames already on their way are expected: drop them quietly.
      this.unsubscribed.add(shareDataId);
    }
  }

  sendSubscribe(subscription) {
    const message = { v: 1, type: "subscribe", shareDataId: subscription.id };
    if (subscription.cursor) message.since = subscription.cursor;
    this.send(message);
    this.awaitingState.delete(subscription.id);
    this.awaitingState.set(subscription.id, null);
  }

  reject(shareDataId, code, message) {
    this.awaitingState.delete(shareDataId);
    if (!this.subscriptions.delete(shareDataId)) return;
    this.emit("error", new RealtimeError("subscription-rejected", `${code}: ${message}`, { shareDataId, code }));
  }

  // -- requests -------------------------------------------------------------------------

  /** Resolves with the proposal-result frame; rejects when it cannot be answered. */
  propose(shareDataId, functionId, proposedData) {
    return this.request("propose", (correlationId) => ({ v: 1, type: "propose", shareDataId, functionId, proposedData, correlationId }));
  }

  /** Resolves with the round trip in seconds. */
  ping() {
    return this.request("ping", (correlationId) => ({ v: 1, type: "ping", correlationId }));
  }

  request(kind, build) {
    if (this.closedByUser || this.state === CLOSED) return Promise.reject(new RealtimeError("closed", "client is closed"));
    if (this.state !== OPEN && this.queue.length >= this.maxQueueSize) {
      return Promise.reject(new RealtimeError("request", `outbound queue full (limit ${this.maxQueueSize})`));
    }
    const correlationId = `c-${this.nextId++}`;
    return new Promise((resolve, reject) => {
      const request = { kind, correlationId, data: build(correlationId), status: "queued", sentAt: null, resolve, reject };
      request.timer = setTimeout(() => {
        const where = request.status === "queued" ? "while queued (never sent)" : "waiting for the answer";
        this.queue = this.queue.filter((r) => r !== request);
        if (this.inFlight.delete(correlationId)) this.abandoned.add(correlationId);
        this.settle(request, null, new RealtimeError("request", `${kind} ${correlationId} timed out after ${this.requestTimeout} s ${where}`));
      }, this.requestTimeout * 1000);
      if (this.state === OPEN) this.sendRequest(request);
      else this.queue.push(request);
    });
  }

  sendRequest(request) {
    request.status = "sent";
    request.sentAt = performance.now();
    this.inFlight.set(request.correlationId, request);
    this.send(request.data);
  }

  settle(request, result, error) {
    if (request.status === "done") return;
    request.status = "done";
    clearTimeout(request.timer);
    this.inFlight.delete(request.correlationId);
    if (error) request.reject(error);
    else request.resolve(result);
  }

  send(message) {
    this.socket.send(JSON.stringify(message));
  }

  // -- input ------------------------------------------------------------------------------

  receive(data) {
    if (this.state !== OPEN) return;
    if (typeof data !== "string") {
      this.emit("error", new RealtimeError("protocol-error", "binary frame from the server skipped: the protocol sends JSON text frames"));
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch (error) {
      this.emit("error", new RealtimeError("protocol-error", `unusable frame from the server skipped: ${error.message}`));
      return;
    }
    if (message === null || typeof message !== "object" || message.v !== 1 || typeof message.type !== "string") {
      this.emit("error", new RealtimeError("protocol-error", "unusable frame from the server skipped: not a version 1 message"));
      return;
    }
    switch (message.type) {
      case "state":
      case "transaction":
      case "lifecycle":
        this.onChannelFrame(message);
        break;
      case "proposal-result":
        this.answered(message, "propose", () => message);
        break;
      case "pong":
        this.answered(message, "ping", (request) => (performance.now() - request.sentAt) / 1000);
        break;
      case "error":
        this.onErrorFrame(message);
        break;
      default:
        this.emit("error", new RealtimeError("protocol-error", `unknown frame type ${JSON.stringify(message.type)} skipped`));
    }
  }

  onChannelFrame(frame) {
    const id = frame.shareDataId;
    const subscription = this.subscriptions.get(id);
    if (frame.type === "state") this.awaitingState.delete(id);
    if (this.unsubscribed.has(id)) {
      // Sent before the server processed our unsubscribe; a new
      // subscription to the same id starts with its state frame.
      if (!subscription || frame.type !== "state") return;
      this.unsubscribed.delete(id);
    }
    if (!subscription) {
      this.emit("error", new RealtimeError("protocol-error", `${frame.type} frame for ${JSON.stringify(id)} skipped: not subscribed to it`));
      return;
    }
    // The cursor rules.
    if (frame.type === "state") subscription.cursor = frame.lastTransactionId ?? null;
    else if (frame.type === "transaction" && !frame.replayed) subscription.cursor = frame.transactionId;
    else if (frame.type === "lifecycle" && frame.event === "removed") {
      subscription.cursor = null;
      this.subscriptions.delete(id);
      this.awaitingState.delete(id);
    }
    this.emit("frame", frame, subscription.cursor);
  }

  answered(frame, kind, result) {
    const request = this.inFlight.get(frame.correlationId);
    if (!request && this.abandoned.delete(frame.correlationId)) return;
    if (!request || request.kind !== kind) {
      this.emit("error", new RealtimeError("protocol-error", `${frame.type} for unknown correlationId ${JSON.stringify(frame.correlationId)} skipped`));
      return;
    }
    this.settle(request, result(request), null);
  }

  onErrorFrame(frame) {
    const request = frame.correlationId === undefined ? undefined : this.inFlight.get(frame.correlationId);
    if (request) {
      this.settle(request, null, new RealtimeError("server-error", `${frame.code}: ${frame.message}`, { code: frame.code }));
      return;
    }
    if (frame.code === "unknown-share-data" || frame.code === "unauthorized-subscribe") {
      const culprit = this.subscribeCulprit(frame);
      if (culprit !== undefined) {
        // Subscribes are answered in order: the named id, else the oldest unanswered.
        this.reject(culprit, frame.code, frame.message);
        if (frame.code === "unknown-share-data") this.culpritDropped = true;
        return;
      }
    }
    this.emit("error", new RealtimeError("server-error", `${frame.code}: ${frame.message}`, { code: frame.code }));
  }

  subscribeCulprit(frame) {
    const message = String(frame.message);
    let named;
    if (frame.code === "unknown-share-data") {
      if (message.startsWith(UNKNOWN_PREFIX) && message.endsWith(UNKNOWN_SUFFIX)) {
        named = message.slice(UNKNOWN_PREFIX.length, -UNKNOWN_SUFFIX.length);
      }
    } else if (message.startsWith(UNAUTHORIZED_PREFIX)) {
      named = message.slice(UNAUTHORIZED_PREFIX.length);
    }
    if (named !== undefined) return this.awaitingState.has(named) ? named : undefined;
    return this.awaitingState.keys().next().value;
  }
}

// -- the page -------------------------------------------------------------------------------

const MAX_LOG_ENTRIES = 200;
const PING_EVERY_MS = 5000;

function startPage() {
  const $ = (id) => document.getElementById(id);
  const el = {
    state: $("connection-state"),
    detail: $("connection-detail"),
    rtt: $("rtt"),
    connectForm: $("connect-form"),
    token: $("token"),
    disconnect: $("disconnect"),
    refresh: $("refresh"),
    connectionNotice: $("connection-notice"),
    notice: $("notice"),
    list: $("share-data-list"),
    listingNote: $("listing-note"),
    subscribeForm: $("subscribe-form"),
    subscribeId: $("subscribe-id"),
    heading: $("selected-heading"),
    cursor: $("cursor"),
    stateView: $("state"),
    proposeForm: $("propose-form"),
    functionId: $("function-id"),
    functionIds: $("function-ids"),
    proposedData: $("proposed-data"),
    useState: $("use-state"),
    result: $("proposal-result"),
    log: $("log"),
  };
  const websocketPath = document.querySelector('meta[name="safe-fast-websocket-path"]').content;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const websocketUrl = `${scheme}//${location.host}${websocketPath}`;
  const listingUrl = `${location.origin}/inspector/share-data.json`;

  // The model; render() shows it, at most once per animation frame.
  const model = {
    connection: IDLE,
    detail: "",
    rtt: null,
    connectionNotice: null, // why the connection is not open; cleared when it opens
    closeNotice: null, // how the last open connection ended
    notice: null, // the latest other problem or news, { text, level }
    listing: null, // null: not known; [] when the server holds nothing
    listingVersion: 0,
    selected: null,
    hasState: false,
    currentState: undefined,
    stateVersion: 0,
    cursor: null,
    newEntries: [],
    clearLog: false,
    result: null,
  };
  const shown = { listingVersion: -1, stateVersion: -1, selected: undefined };
  let frameRequested = false;
  let client = null;
  let pinger = null;

  function invalidate() {
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(render);
  }

  function onEvent(source, name, ...args) {
    if (source !== client) return; // a client the page has replaced
    switch (name) {
      case "state": {
        const [state, detail] = args;
        model.connection = state;
        model.detail = detail;
        if (state !== OPEN) {
          clearInterval(pinger);
          model.rtt = null;
        }
        break;
      }
      case "open":
        model.closeNotice = model.connectionNotice = null;
        ping();
        clearInterval(pinger);
        pinger = setInterval(ping, PING_EVERY_MS);
        break;
      case "listing":
        model.listing = args[0];
        model.listingVersion += 1;
        break;
      case "close": {
        const [code, reason] = args;
        if (code !== 1000) model.closeNotice = model.connectionNotice = `Connection closed: ${describeClose(code, reason)}`;
        break;
      }
      case "error": {
        const [error] = args;
        if (error.kind === "unauthorized") model.connectionNotice = error.status === 401 ? UNAUTHORIZED_MESSAGE : `Unauthorized: ${error.message}`;
        else if (error.kind === "connection-failed") {
          // Keep saying why the connection was lost; add how the retry went.
          model.connectionNotice = model.closeNotice ? `${model.closeNotice}. Retrying: ${error.message}` : error.message;
        } else if (error.kind === "connection-closed") model.connectionNotice = error.message;
        else if (error.kind === "subscription-rejected") {
          model.notice = { text: `Subscription to ${error.shareDataId} refused: ${error.message}`, level: "error" };
          if (error.shareDataId === model.selected) model.selected = null;
        } else if (error.code === "replay-cursor-not-found") model.notice = { text: `${error.message} (the state shown is current)`, level: "info" };
        else model.notice = { text: error.message, level: "error" };
        break;
      }
      case "frame":
        onFrame(...args);
        break;
    }
    invalidate();
  }

  function onFrame(frame, cursor) {
    if (frame.shareDataId !== model.selected) return;
    model.cursor = cursor;
    const time = new Date();
    if (frame.type === "state") {
      model.hasState = true;
      model.currentState = frame.currentState;
      model.stateVersion += 1;
    } else if (frame.type === "transaction") {
      if ("currentState" in frame) {
        model.currentState = frame.currentState;
        model.stateVersion += 1;
      }
      model.newEntries.push({ id: frame.transactionId, accepted: frame.accepted, replayed: Boolean(frame.replayed), time });
    } else if (frame.type === "lifecycle") {
      if (frame.event === "updated") {
        model.currentState = frame.currentState;
        model.stateVersion += 1;
      } else {
        model.notice = { text: `ShareData ${frame.shareDataId} was removed`, level: "info" };
        model.selected = null;
        model.hasState = false;
        model.stateVersion += 1;
        refreshListing();
      }
      model.newEntries.push({ id: "", lifecycle: frame.event, time });
    }
    if (model.newEntries.length > MAX_LOG_ENTRIES) model.newEntries.splice(0, model.newEntries.length - MAX_LOG_ENTRIES);
  }

  /** Ask for the listing again (it is otherwise fetched on each connection attempt). */
  function refreshListing() {
    if (!client) return;
    const source = client;
    source.fetchListing().then(
      (listing) => onEvent(source, "listing", listing),
      (error) => onEvent(source, "error", error),
    );
  }

  function ping() {
    if (!client) return;
    const source = client;
    source.ping().then(
      (seconds) => {
        if (source !== client) return;
        model.rtt = seconds;
        invalidate();
      },
      () => {}, // a lost connection is reported by its close
    );
  }

  function connect() {
    if (client) client.close();
    const source = new InspectorClient({
      websocketUrl,
      listingUrl,
      token: el.token.value.trim(),
      emit: (name, ...args) => onEvent(source, name, ...args),
    });
    client = source;
    model.closeNotice = model.connectionNotice = null;
    model.notice = null;
    if (model.selected) subscribeSelected();
    source.connect();
  }

  function disconnect() {
    if (!client) return;
    const source = client;
    source.close();
    client = null;
    clearInterval(pinger);
    model.connection = CLOSED;
    model.detail = "disconnected";
    model.rtt = null;
    invalidate();
  }

  function select(id) {
    if (!id) return;
    if (client && model.selected && model.selected !== id) client.unsubscribe(model.selected);
    model.selected = id;
    model.notice = null;
    model.hasState = false;
    model.currentState = undefined;
    model.stateVersion += 1;
    model.cursor = null;
    model.newEntries = [];
    model.clearLog = true;
    model.result = null;
    el.functionId.value = "";
    if (client && client.state !== CLOSED) subscribeSelected();
    invalidate();
  }

  function subscribeSelected() {
    try {
      client.subscribe(model.selected);
    } catch (error) {
      model.notice = { text: error.message, level: "error" };
      invalidate();
    }
  }

  function propose(event) {
    event.preventDefault();
    const showResult = (text, level) => {
      model.result = { text, level };
      invalidate();
    };
    if (!model.selected) return showResult("Not sent: select a ShareData first.", "error");
    const functionId = el.functionId.value.trim();
    if (!functionId) return showResult("Not sent: enter a function id.", "error");
    let proposedData;
    try {
      proposedData = JSON.parse(el.proposedData.value);
      el.proposedData.removeAttribute("aria-invalid");
    } catch (error) {
      el.proposedData.setAttribute("aria-invalid", "true");
      return showResult(`Not sent: the proposed data is not valid JSON (${error.message}).`, "error");
    }
    if (!client || client.state === CLOSED) return showResult("Not sent: not connected (press Connect).", "error");
    const shareDataId = model.selected;
    showResult(`Proposing ${functionId} on ${shareDataId}…`, "pending");
    client.propose(shareDataId, functionId, proposedData).then(
      (result) => {
        if (result.accepted) showResult(`Accepted: transaction ${result.transactionId}.`, "ok");
        else if (result.error !== undefined) showResult(`Refused by the server: ${result.error}`, "error");
        else showResult(`Rejected by the rule: transaction ${result.transactionId} recorded with accepted: false.`, "error");
      },
      (error) => showResult(`No answer: ${error.message}`, "error"),
    );
  }

  // -- rendering ------------------------------------------------------------------------

  function render() {
    frameRequested = false;
    el.state.textContent = model.connection;
    el.state.dataset.state = model.connection;
    el.detail.textContent = model.detail;
    el.rtt.textContent = model.rtt === null ? "" : `ping ${(model.rtt * 1000).toFixed(1)} ms`;
    el.disconnect.disabled = !client;

    el.connectionNotice.hidden = !model.connectionNotice;
    el.connectionNotice.textContent = model.connectionNotice || "";
    el.notice.hidden = !model.notice;
    el.notice.textContent = model.notice ? model.notice.text : "";
    el.notice.dataset.level = model.notice ? model.notice.level : "";

    if (shown.listingVersion !== model.listingVersion || shown.selected !== model.selected) renderListing();
    if (shown.selected !== model.selected) {
      el.heading.textContent = model.selected ? `ShareData ${model.selected}` : "Select a ShareData";
      shown.selected = model.selected;
    }
    el.cursor.textContent = model.selected ? `cursor (last transaction id): ${model.cursor ?? "none"}` : "";
    if (shown.stateVersion !== model.stateVersion) {
      el.stateView.textContent = model.hasState ? JSON.stringify(model.currentState, null, 2) ?? "undefined" : "";
      shown.stateVersion = model.stateVersion;
    }
    el.result.textContent = model.result ? model.result.text : "";
    el.result.dataset.level = model.result ? model.result.level : "";
    renderLog();
  }

  function renderListing() {
    shown.listingVersion = model.listingVersion;
    const listing = model.listing;
    el.listingNote.textContent =
      listing === null ? "The server cannot list its ShareData for this page; subscribe by id below." : listing.length === 0 ? "The server holds no ShareData." : "";
    const items = (listing || []).map((entry) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.id = entry.id;
      button.setAttribute("aria-pressed", String(entry.id === model.selected));
      const name = document.createElement("span");
      name.className = "id";
      name.textContent = entry.id;
      const functions = document.createElement("small");
      functions.textContent = entry.functionIds.length ? entry.functionIds.join(", ") : "no functions";
      button.append(name, functions);
      item.append(button);
      return item;
    });
    el.list.replaceChildren(...items);
    const selected = (listing || []).find((entry) => entry.id === model.selected);
    el.functionIds.replaceChildren(
      ...(selected ? selected.functionIds : []).map((id) => {
        const option = document.createElement("option");
        option.value = id;
        return option;
      }),
    );
  }

  function renderLog() {
    if (model.clearLog) {
      el.log.replaceChildren();
      model.clearLog = false;
    }
    if (model.newEntries.length === 0) return;
    const rows = document.createDocumentFragment();
    for (let i = model.newEntries.length - 1; i >= 0; i -= 1) rows.append(logRow(model.newEntries[i]));
    model.newEntries = [];
    el.log.prepend(rows);
    while (el.log.childElementCount > MAX_LOG_ENTRIES) el.log.lastElementChild.remove();
  }

  function logRow(entry) {
    const row = document.createElement("tr");
    let outcome;
    let how;
    if (entry.lifecycle) {
      outcome = entry.lifecycle;
      how = "lifecycle";
      row.className = "lifecycle";
    } else {
      outcome = entry.accepted ? "accepted" : "rejected";
      how = entry.replayed ? "replayed" : "live";
      row.className = `${outcome} ${how}`;
    }
    const time = entry.time.toLocaleTimeString([], { hour12: false }) + `.${String(entry.time.getMilliseconds()).padStart(3, "0")}`;
    for (const text of [entry.id, outcome, how, time]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }

  // -- wiring ---------------------------------------------------------------------------

  el.connectForm.addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  el.disconnect.addEventListener("click", disconnect);
  el.refresh.addEventListener("click", refreshListing);
  el.list.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-id]");
    if (button) select(button.dataset.id);
  });
  el.subscribeForm.addEventListener("submit", (event) => {
    event.preventDefault();
    select(el.subscribeId.value.trim());
  });
  el.proposeForm.addEventListener("submit", propose);
  el.proposedData.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      el.proposeForm.requestSubmit();
    }
  });
  el.useState.addEventListener("click", () => {
    if (model.hasState) el.proposedData.value = JSON.stringify(model.currentState, null, 2);
  });

  const token = new URLSearchParams(location.search).get("token");
  if (token) el.token.value = token;
  connect();
}

if (typeof document !== "undefined") startPage();
