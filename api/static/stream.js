// The job's live stream of metric and status events.
import { ApiError, apiKey, authHeaders, showProblem } from "./util.js";

// Server-Sent Events. EventSource reconnects by itself with Last-Event-ID, but cannot send an
// Authorization header; with a key set, the same protocol is spoken over fetch instead.
export function openStream(url, handlers, onState) {
  if (!apiKey()) {
    const source = new EventSource(url);
    source.addEventListener("open", () => onState("connected"));
    for (const [name, fn] of Object.entries(handlers)) {
      source.addEventListener(name, (e) => fn(JSON.parse(e.data)));
    }
    source.addEventListener("error", () => onState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting…"));
    return () => source.close();
  }
  let stopped = false, lastId = null, retry = 2000;
  const controller = new AbortController();
  async function run() {
    while (!stopped) {
      try {
        const headers = { Accept: "text/event-stream", ...authHeaders() };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await fetch(url, { headers, signal: controller.signal });
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          throw new ApiError(response.status, body);
        }
        onState("connected");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replaceAll("\r\n", "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let event = "message", id = null;
            const data = [];
            for (const line of block.split("\n")) {
              const [field, ...rest] = line.split(":");
              const text = rest.join(":").replace(/^ /, "");
              if (field === "event") event = text;
              else if (field === "data") data.push(text);
              else if (field === "id") id = text;
              else if (field === "retry" && /^\d+$/.test(text)) retry = Number(text);
            }
            if (id !== null) lastId = id;
            if (data.length && handlers[event]) handlers[event](JSON.parse(data.join("\n")));
            if (event === "end") { stopped = true; return; }
          }
        }
      } catch (error) {
        if (stopped) return;
        if (error instanceof ApiError && error.status < 500) { onState("closed"); showProblem(error); return; }
      }
      if (stopped) return;
      onState("reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, retry));
    }
  }
  run();
  return () => { stopped = true; controller.abort(); };
}
