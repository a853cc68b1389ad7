// The Node `ws` server of connect_storm.py, speaking _harness.py's server lines.
//
//   node --expose-gc node_ws_server.js      (NODE_PATH must reach an installed `ws`)
//
// Listens on 127.0.0.1 (ephemeral port) with Node's and ws' defaults (listen
// backlog 511, no compression), answers each connection's first message (the
// subscribe) with the same `state` frame the Python peer servers send, and
// obeys stdin lines: `subs` -> `SUBS n`, `rss` -> `RSS rss_kib maxrss_kib`,
// `quit` (or EOF) -> exit.
"use strict";

const readline = require("readline");
const { WebSocketServer } = require("ws");
const wsVersion = require("ws/package.json").version;

const ACK = '{"v":1,"type":"state","shareDataId":"bench","currentState":null,"lastTransactionId":null}';
let subscribers = 0;

const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, path: "/realtime", perMessageDeflate: false });

wss.on("connection", (ws) => {
  let subscribed = false;
  ws.once("message", () => {
    subscribed = true;
    subscribers += 1;
    ws.send(ACK);
  });
  ws.on("close", () => {
    if (subscribed) subscribers -= 1;
  });
  ws.on("error", () => {});
});

wss.on("listening", () => {
  process.stdout.write(`READY ${wss.address().port} node_${process.version}_ws_${wsVersion}\n`);
});

const lines = readline.createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const cmd = line.trim().split(/\s+/)[0];
  if (cmd === "subs") {
    process.stdout.write(`SUBS ${subscribers}\n`);
  } else if (cmd === "rss") {
    if (global.gc) global.gc(); // with --expose-gc, as the Python servers collect first
    const usage = process.resourceUsage();
    process.stdout.write(`RSS ${Math.round(process.memoryUsage().rss / 1024)} ${usage.maxRSS}\n`);
  } else if (cmd === "quit") {
    process.exit(0);
  } else if (cmd) {
    process.stdout.write(`ERR unknown command ${cmd}\n`);
  }
});
lines.on("close", () => process.exit(0));
