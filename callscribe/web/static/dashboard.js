// callscribe live dashboard: calls from /events/calls, each call's events from /events/calls/{id}.
// Server-Sent Events ids are Redis stream entry ids, so EventSource's own reconnect (it sends
// Last-Event-ID) resumes exactly where the page left off. Events are deduplicated per leg on `seq`
// (delivery is at-least-once). Jumps in `seq` are only counted (data-gaps): the publisher coalesces
// superseded partials while Redis is slow, so a jump is not a loss.
"use strict";

// Chromium allows 6 HTTP/1.1 connections per host; one is the calls index, one is kept spare.
const MAX_FOLLOWED = 4;
const MAX_ENDED_SHOWN = 6;

const params = new URLSearchParams(location.search);
const historyMin = params.get("history_min") || "240";
const calls = new Map(); // call_id -> CallView
const waiting = []; // call ids waiting for a free stream slot
let following = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function offset(ms) {
  if (ms === null || ms === undefined) return "";
  const total = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
  const mmss = `${String(m).padStart(h ? 2 : 1, "0")}:${String(s).padStart(2, "0")}`;
  return h ? `${h}:${mmss}` : mmss;
}

function clock(epochMs) {
  return new Date(epochMs).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

class LegView {
  constructor(call, name) {
    this.call = call;
    this.name = name;
    this.lastSeq = 0;
    this.lastFinalUtt = -1;
    this.lastError = null;
    this.startedTs = null;
    // tabindex: a scrollable region must be reachable from the keyboard.
    this.list = el("ol", { class: "transcript", role: "log", "aria-live": "polite", tabindex: "0",
                           "aria-label": `${name} transcript` });
    this.stable = el("span", { class: "stable" });
    this.unstable = el("span", { class: "unstable" });
    // The partial changes many times a second: hidden from screen readers, finals are announced.
    this.partial = el("p", { class: "partial", "aria-hidden": "true" });
    this.state = el("span", { class: "leg-state" });
    this.node = el("section", { class: "leg", "data-leg": name },
      el("h4", {}, el("span", { class: "leg-name", text: name }), this.state), this.list, this.partial);
  }

  // Lines are kept in leg-time order (`at`, ms from the leg's start), not arrival order: a final
  // can arrive after a later DTMF or error when the engine runs behind.
  add(item, at) {
    const atBottom = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 40;
    item.dataset.at = at;
    const next = [...this.list.children].find((child) => Number(child.dataset.at) > at);
    this.list.insertBefore(item, next || null);
    if (atBottom) this.list.scrollTop = this.list.scrollHeight;
  }

  wall(ms) {
    return this.startedTs === null || ms === null ? "" : clock(this.startedTs + ms);
  }

  apply(ev) {
    switch (ev.type) {
      case "leg.started":
        this.startedTs = ev.ts;
        this.state.textContent = `started ${clock(ev.ts)}`;
        this.add(el("li", { class: "event lifecycle" }, el("time", { text: "0:00" }),
          el("span", { text: `leg started${ev.meta && ev.meta.transport ? ` (${ev.meta.transport})` : ""}` })), 0);
        break;
      case "partial":
        if (ev.utt !== null && ev.utt <= this.lastFinalUtt) break;
        this.stable.textContent = ev.stable;
        this.unstable.textContent = ev.unstable ? (ev.stable ? " " : "") + ev.unstable : "";
        this.partial.replaceChildren(this.stable, this.unstable);
        this.partial.dataset.utt = ev.utt;
        break;
      case "final": {
        this.lastFinalUtt = Math.max(this.lastFinalUtt, ev.utt ?? -1);
        if (this.partial.dataset.utt !== undefined && Number(this.partial.dataset.utt) <= this.lastFinalUtt) {
          this.partial.replaceChildren();
          delete this.partial.dataset.utt;
        }
        if (!ev.text) break; // an utterance of noise: nothing to read
        const time = el("time", { text: `${offset(ev.start_ms)}–${offset(ev.end_ms)}`,
                                  title: `${this.wall(ev.start_ms)} – ${this.wall(ev.end_ms)}` });
        this.add(el("li", { class: "final", "data-utt": ev.utt }, time, el("span", { class: "text", text: ev.text })),
                 ev.start_ms ?? 0);
        break;
      }
      case "dtmf":
        this.add(el("li", { class: "event dtmf" }, el("time", { text: offset(ev.start_ms) }),
          el("span", { class: "chip dtmf", text: `DTMF ${ev.text}` })), ev.start_ms ?? 0);
        break;
      case "leg.ended":
        this.partial.replaceChildren();
        this.node.dataset.ended = "true";
        this.state.textContent = `ended ${clock(ev.ts)}`;
        this.add(el("li", { class: "event lifecycle" }, el("time", { text: offset(ev.end_ms) }),
          el("span", { text: `leg ended${ev.meta && ev.meta.reason ? ` (${ev.meta.reason})` : ""}` })),
          Number.MAX_SAFE_INTEGER);
        break;
      case "error": {
        // An overloaded engine repeats the same error: count it on one line instead of flooding.
        const last = this.lastError;
        if (last && last.dataset.text === ev.text) {
          last.dataset.count = Number(last.dataset.count) + 1;
          last.querySelector(".repeat").textContent = ` ×${last.dataset.count}`;
          break;
        }
        const at = this.startedTs === null ? 0 : Math.max(0, ev.ts - this.startedTs);
        const item = el("li", { class: "event error", role: "alert", "data-text": ev.text, "data-count": "1" },
          el("time", { text: offset(at) }), el("span", { text: `error: ${ev.text}` }, el("span", { class: "repeat" })));
        this.add(item, at);
        this.lastError = item;
        break;
      }
    }
  }
}

class CallView {
  constructor(callId) {
    this.callId = callId;
    this.legs = new Map();
    this.lastSeq = new Map(); // leg ("" for call-level events) -> last seq applied
    this.counts = { events: 0, gaps: 0, duplicates: 0, reconnects: 0 };
    this.startedTs = null;
    this.endedTs = null;
    this.source = null;
    this.ended = false;
    const headingId = `call-${callId.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    this.badge = el("span", { class: "badge waiting", text: "waiting" });
    this.facts = el("p", { class: "facts" });
    this.legsNode = el("div", { class: "legs" });
    this.node = el("article", { class: "call", "data-call-id": callId, "data-state": "waiting",
                                "aria-labelledby": headingId },
      el("header", {}, el("h3", { id: headingId }, "Call ", el("code", { text: callId })), this.badge, this.facts),
      this.legsNode);
    this.sync();
  }

  leg(name) {
    let view = this.legs.get(name);
    if (!view) {
      view = new LegView(this, name);
      this.legs.set(name, view);
      // Caller first, then agent, then anything else in arrival order.
      const rank = (n) => (n === "caller" ? 0 : n === "agent" ? 1 : 2);
      const after = [...this.legs.values()].find((v) => v !== view && rank(v.name) > rank(name));
      this.legsNode.insertBefore(view.node, after ? after.node : null);
    }
    return view;
  }

  follow() {
    if (this.source) return;
    following += 1;
    this.source = new EventSource(`/events/calls/${encodeURIComponent(this.callId)}`);
    this.source.onmessage = (msg) => this.receive(JSON.parse(msg.data));
    this.source.onerror = () => {
      // CONNECTING: the browser retries and resumes with Last-Event-ID; CLOSED: it gave up.
      if (this.source && this.source.readyState === EventSource.CONNECTING) this.counts.reconnects += 1;
      else this.unfollow();
      this.sync();
    };
    if (!this.ended) this.setState("live");
  }

  unfollow() {
    if (!this.source) return;
    this.source.close();
    this.source = null;
    following -= 1;
    followNext();
  }

  receive(ev) {
    const key = ev.leg || "";
    const last = this.lastSeq.get(key) || 0;
    if (ev.seq <= last) {
      this.counts.duplicates += 1;
      this.sync();
      return;
    }
    if (last && ev.seq > last + 1) this.counts.gaps += ev.seq - last - 1;
    this.lastSeq.set(key, ev.seq);
    this.counts.events += 1;
    if (ev.type === "call.started") {
      this.startedTs = ev.ts;
    } else if (ev.type === "call.ended") {
      this.markEnded(ev.ts);
      this.unfollow(); // nothing follows call.ended in a call's stream
    } else if (ev.leg) {
      this.leg(ev.leg).apply(ev);
    }
    this.sync();
  }

  markEnded(ts) {
    if (this.ended) return;
    this.ended = true;
    this.endedTs = ts;
    this.setState("ended");
    document.getElementById("ended-calls").prepend(this.node);
    const shown = document.querySelectorAll("#ended-calls > .call");
    for (let i = MAX_ENDED_SHOWN; i < shown.length; i += 1) {
      const old = calls.get(shown[i].dataset.callId);
      if (old) { old.unfollow(); calls.delete(old.callId); }
      shown[i].remove();
    }
    updateCounts();
  }

  setState(state) {
    this.node.dataset.state = state;
    this.badge.className = `badge ${state}`;
    this.badge.textContent = state === "live" ? "● live" : state;
  }

  sync() {
    const c = this.counts;
    Object.assign(this.node.dataset, { events: c.events, gaps: c.gaps, duplicates: c.duplicates, reconnects: c.reconnects });
    const parts = [];
    if (this.startedTs) parts.push(`started ${clock(this.startedTs)}`);
    if (this.startedTs) parts.push(`${offset((this.endedTs || Date.now()) - this.startedTs)} long`);
    if (this.legs.size) parts.push(`${this.legs.size} leg${this.legs.size > 1 ? "s" : ""}`);
    this.facts.textContent = parts.join(" · ");
  }
}

function followNext() {
  while (following < MAX_FOLLOWED && waiting.length) {
    const view = calls.get(waiting.shift());
    if (view && !view.source) view.follow();
  }
}

function want(view) {
  if (!view.source && !waiting.includes(view.callId)) waiting.push(view.callId);
  followNext();
}

function callView(callId) {
  let view = calls.get(callId);
  if (!view) {
    view = new CallView(callId);
    calls.set(callId, view);
    document.getElementById("active-calls").prepend(view.node);
  }
  return view;
}

function updateCounts() {
  const active = [...calls.values()].filter((v) => !v.ended).length;
  document.getElementById("active-count").textContent = `${active} active call${active === 1 ? "" : "s"}`;
  document.getElementById("no-active").hidden = active > 0;
  document.getElementById("ended-section").hidden = !document.querySelector("#ended-calls > .call");
}

function setFeed(state, text) {
  const feed = document.getElementById("feed-status");
  feed.dataset.state = state;
  feed.textContent = text;
}

function watchCalls() {
  let live = false;
  const replayed = []; // call ids seen before the index caught up, newest last
  const source = new EventSource(`/events/calls?history_min=${encodeURIComponent(historyMin)}`);
  source.onmessage = (msg) => {
    const ev = JSON.parse(msg.data);
    if (ev.type === "call.started") {
      const view = callView(ev.call_id);
      view.startedTs = ev.ts;
      view.sync();
      if (live) want(view);
      else replayed.push(ev.call_id);
    } else if (ev.type === "call.ended") {
      const view = calls.get(ev.call_id);
      if (view && !live) view.markEnded(ev.ts);
      // Live calls end from their own stream, after their last final has been shown.
    }
    updateCounts();
  };
  source.addEventListener("live", () => {
    if (!live) {
      live = true;
      // Active calls first, then the most recent ended ones (their transcripts, for context).
      const ids = replayed.reverse().filter((id) => calls.has(id));
      for (const id of ids) if (!calls.get(id).ended) want(calls.get(id));
      for (const id of ids.filter((i) => calls.get(i).ended).slice(0, MAX_ENDED_SHOWN)) want(calls.get(id));
    }
    setFeed("live", "Live");
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) setFeed("error", "Disconnected — reload the page to retry");
    else setFeed("reconnecting", "Reconnecting…");
  };
  source.onopen = () => { if (live) setFeed("live", "Live"); };
}

setInterval(() => { for (const view of calls.values()) if (!view.ended) view.sync(); }, 1000);
watchCalls();
