// A PeerJS signaling server for the tests: PeerServer from the npm package `peer` (found through NODE_PATH),
// on 127.0.0.1. Options as JSON in argv[2]: port (0: any free one), key, path, expire_timeout, alive_timeout.
// Prints {"event":"listening","port":N} once it listens, then one JSON line per thing clients do.
"use strict";
const { PeerServer } = require("peer");

const options = JSON.parse(process.argv[2] || "{}");
const print = (event) => process.stdout.write(JSON.stringify(event) + "\n");
const server = PeerServer(
  { port: 0, key: "peerjs", path: "/", expire_timeout: 5000, alive_timeout: 60000, ...options,
    host: "127.0.0.1", allow_discovery: false },
  (http) => print({ event: "listening", port: http.address().port }),
);
server.on("connection", (client) => print({ event: "connection", id: client.getId() }));
server.on("disconnect", (client) => print({ event: "disconnect", id: client.getId() }));
server.on("message", (client, message) => print({ event: "message", type: message.type, src: client.getId(),
  dst: message.dst, payload: message.type === "HEARTBEAT" ? undefined : message.payload }));
server.on("error", (error) => print({ event: "error", message: String(error) }));  // else a bad client ends it
