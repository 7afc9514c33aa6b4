// Crash handler: echoes like echo.js until a received chunk contains the
// bytes `crash`, then throws. Only this connection's instance is affected.
import { readChunk, writeAll } from "./echo.js";

const CRASH = [0x63, 0x72, 0x61, 0x73, 0x68]; // "crash"

function containsCrash(bytes) {
  outer: for (let i = 0; i + CRASH.length <= bytes.length; i++) {
    for (let j = 0; j < CRASH.length; j++) {
      if (bytes[i + j] !== CRASH[j]) continue outer;
    }
    return true;
  }
  return false;
}

export const handler = {
  handle(conn, input, output) {
    for (;;) {
      const chunk = readChunk(input);
      if (chunk === null) return;
      if (containsCrash(chunk)) throw new Error("received `crash`");
      writeAll(output, chunk);
    }
  },
};
