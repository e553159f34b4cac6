// callscribe supervisor: every active call in one grid from ONE event stream (/events/active).
// Untrusted text (transcripts, metadata) only ever goes through textContent, never innerHTML.
// Events are deduplicated per call+leg on `seq` (delivery is at-least-once; a reconnect replays).
"use strict";

const REDACTED = "[redacted]";
const FINALS_SHOWN = 3;
const ENDED_KEEP_MS = 15000;
const params = new URLSearchParams(location.search);
const calls = new Map(); // call_id -> CallCard
let alertPhrases = [];

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Leg/call metadata worth a supervisor's eye, from whichever ingest set it.
function metaSummary(meta) {
  const out = [];
  const sip = meta.sip || {};
  const custom = meta.custom || meta.metadata || {};
  const pick = (label, value) => { if (value && typeof value !== "object") out.push([label, String(value)]); };
  pick("from", sip.from || meta.from || custom.from);
  pick("to", sip.to || meta.to || custom.to);
  pick("agent", meta.agent || custom.agent);
  pick("queue", meta.queue || custom.queue);
  pick("label", meta.label);
  for (const [k, v] of Object.entries(custom)) {
    if (!["from", "to", "agent", "queue"].includes(k)) pick(k, v);
  }
  return out.slice(0, 8);
}

// Text as nodes: [redacted] tokens styled, alert phrases marked; all via textContent.
function renderText(node, text) {
  node.replaceChildren();
  const lower = text.toLowerCase();
  const hits = [];
  for (const phrase of alertPhrases) {
    let at = lower.indexOf(phrase);
    while (phrase && at >= 0) { hits.push([at, at + phrase.length]); at = lower.indexOf(phrase, at + phrase.length); }
  }
  hits.sort((a, b) => a[0] - b[0]);
  let pos = 0;
  // A run of masked words (a card number is 16 of them) shows as one "redacted" chip.
  const plain = (chunk) => {
    chunk.split(/(\[redacted\](?: \[redacted\])*)/).forEach((part) => {
      if (!part) return;
      if (!part.startsWith(REDACTED)) { node.append(document.createTextNode(part)); return; }
      const words = part.split(" ").length;
      const chip = el("span", "redacted", words > 1 ? `redacted ×${words}` : "redacted");
      chip.title = "redacted by callscribe before publishing";
      node.append(chip);
    });
  };
  for (const [start, end] of hits) {
    if (start < pos) continue;
    plain(text.slice(pos, start));
    node.append(el("mark", "alert", text.slice(start, end)));
    pos = end;
  }
  plain(text.slice(pos));
  return hits.length > 0;
}

class CallCard {
  constructor(callId) {
    this.callId = callId;
    this.meta = {};
    this.legs = new Map(); // leg -> {node, finals, partial, lastSeq, meta}
    this.lastSeq = new Map();
    this.searchText = "";
    this.node = el("article", "sv-call");
    this.node.dataset.callId = callId;
    this.node.dataset.state = "active";
    this.node.append(el("h3", "", callId));
    this.metaNode = el("p", "sv-meta");
    this.node.append(this.metaNode);
    this.body = el("div", "sv-legs");
    this.node.append(this.body);
    document.getElementById("grid").append(this.node);
  }

  leg(name) {
    let leg = this.legs.get(name);
    if (!leg) {
      const node = el("div", "sv-leg");
      node.dataset.leg = name;
      const head = el("div", "");
      head.append(el("span", "who", name), el("span", "sv-meta"));
      const finals = el("div", "finals");
      const partial = el("span", "line partial");
      node.append(head, finals, partial);
      this.body.append(node);
      leg = { node, head, finals, partial, meta: {} };
      this.legs.set(name, leg);
    }
    return leg;
  }

  fresh(event) {
    const key = event.leg || "";
    if ((this.lastSeq.get(key) || 0) >= event.seq) return false;
    this.lastSeq.set(key, event.seq);
    return true;
  }

  apply(event) {
    if (event.type !== "partial" && !this.fresh(event)) return;
    this.node.dataset.updated = String(Date.now());
    switch (event.type) {
      case "call.started":
        this.meta = event.meta || {};
        this.showMeta(this.metaNode, this.meta);
        break;
      case "leg.started": {
        const leg = this.leg(event.leg);
        leg.meta = event.meta || {};
        this.showMeta(leg.head.lastChild, leg.meta);
        break;
      }
      case "partial":
        if ((this.lastSeq.get(event.leg) || 0) >= event.seq) return;
        renderText(this.leg(event.leg).partial, event.text || "");
        break;
      case "final": {
        const leg = this.leg(event.leg);
        leg.partial.textContent = "";
        if (!event.text) break;
        const line = el("span", "line final");
        line.dataset.seq = String(event.seq);
        if (renderText(line, event.text)) this.alert(event);
        leg.finals.append(line);
        while (leg.finals.childElementCount > FINALS_SHOWN) leg.finals.firstElementChild.remove();
        this.searchText += " " + event.text.toLowerCase();
        break;
      }
      case "dtmf":
        this.leg(event.leg).finals.append(el("span", "line chip dtmf", `DTMF ${event.text}`));
        break;
      case "call.ended":
        this.node.dataset.state = "ended";
        setTimeout(() => { this.node.remove(); calls.delete(this.callId); updateCounts(); }, ENDED_KEEP_MS);
        break;
      default:
        break;
    }
    applyFilter(this);
    updateCounts();
  }

  showMeta(node, meta) {
    node.replaceChildren();
    for (const [label, value] of metaSummary(meta)) node.append(el("span", "", `${label}: ${value}`));
    this.searchText += " " + JSON.stringify(meta).toLowerCase();
  }

  alert(event) {
    if (!this.node.dataset.alert) this.node.dataset.alert = String(Date.now());
    this.node.dataset.alertSeq = `${event.leg}:${event.seq}`;
    document.getElementById("grid").prepend(this.node); // flagged calls first
  }
}

function applyFilter(card) {
  const query = document.getElementById("filter").value.trim().toLowerCase();
  const alertsOnly = document.getElementById("alerts-only").checked;
  const match = (!query || card.searchText.includes(query) || card.callId.toLowerCase().includes(query))
    && (!alertsOnly || card.node.dataset.alert);
  card.node.classList.toggle("hidden-by-filter", !match);
}

function updateCounts() {
  const active = [...calls.values()].filter((c) => c.node.dataset.state === "active").length;
  document.getElementById("active-count").textContent = `${active} active call${active === 1 ? "" : "s"}`;
  const alerts = [...calls.values()].filter((c) => c.node.dataset.alert).length;
  document.getElementById("alert-count").textContent = `${alerts} alert${alerts === 1 ? "" : "s"}`;
  document.getElementById("no-active").hidden = calls.size > 0;
}

function connect() {
  const status = document.getElementById("feed-status");
  const source = new EventSource(`/events/active?history_min=${encodeURIComponent(params.get("history_min") || "60")}`);
  source.onopen = () => { status.dataset.state = "live"; status.textContent = "Live"; };
  source.onerror = () => { status.dataset.state = "reconnecting"; status.textContent = "Reconnecting…"; };
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch { return; }
    if (!event.call_id) return;
    let card = calls.get(event.call_id);
    if (!card) { card = new CallCard(event.call_id); calls.set(event.call_id, card); }
    card.apply(event);
  };
}

async function start() {
  try {
    const config = await (await fetch("/supervisor/config")).json();
    alertPhrases = (config.alert_phrases || []).map((p) => String(p).toLowerCase()).filter(Boolean);
  } catch { alertPhrases = []; }
  const phrases = document.getElementById("alert-phrases");
  for (const p of alertPhrases) phrases.append(el("span", "phrase", p));
  for (const id of ["filter", "alerts-only"]) {
    document.getElementById(id).addEventListener("input", () => calls.forEach(applyFilter));
  }
  connect();
}

start();
