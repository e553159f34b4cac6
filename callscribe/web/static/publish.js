// Publishes the microphone as one leg over WHIP (RFC 9725): one offer with every ICE candidate
// (callscribe does not take trickle ICE), the answer in the 201, DELETE on its Location to hang up.
"use strict";

const form = document.getElementById("publish");
const statusLine = document.getElementById("status");
const params = new URLSearchParams(location.search);
for (const name of ["call_id", "leg", "token"]) if (params.has(name)) form.elements[name].value = params.get(name);
if (!form.elements.call_id.value) form.elements.call_id.value = `web-${Math.random().toString(36).slice(2, 10)}`;

let pc = null;
let stream = null;
let resource = null;

function setStatus(state, text) {
  statusLine.dataset.state = state;
  statusLine.textContent = text;
}

function authHeaders() {
  const token = form.elements.token.value;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function gatheringComplete(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") resolve(); };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // host candidates come at once; do not wait on a slow interface
  });
}

async function start() {
  setStatus("starting", "Opening the microphone…");
  stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false }, video: false,
  });
  pc = new RTCPeerConnection();
  pc.addTransceiver(stream.getAudioTracks()[0], { direction: "sendonly", streams: [stream] });
  pc.onconnectionstatechange = () => {
    if (pc) setStatus(pc.connectionState, `Connection ${pc.connectionState}.`);
  };
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringComplete(pc, 2000);
  const query = new URLSearchParams({ call_id: form.elements.call_id.value, leg: form.elements.leg.value });
  const response = await fetch(`/whip?${query}`, {
    method: "POST", headers: { "Content-Type": "application/sdp", ...authHeaders() }, body: pc.localDescription.sdp,
  });
  if (response.status !== 201) throw new Error(`WHIP answered ${response.status}: ${await response.text()}`);
  resource = new URL(response.headers.get("Location"), location.href);
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  document.getElementById("stop").disabled = false;
  document.getElementById("start").disabled = true;
  setStatus("negotiated", "Negotiated; connecting…");
}

async function hangUp() {
  const target = resource;
  resource = null;
  if (target) await fetch(target, { method: "DELETE", headers: authHeaders() });
  if (pc) { pc.close(); pc = null; }
  if (stream) { for (const track of stream.getTracks()) track.stop(); stream = null; }
  document.getElementById("stop").disabled = true;
  document.getElementById("start").disabled = false;
  setStatus("ended", "Hung up.");
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  start().catch((err) => hangUp().finally(() => setStatus("error", String(err))));
});
document.getElementById("stop").addEventListener("click", () => { hangUp(); });
window.callscribeHangUp = hangUp; // lets an automated test end the call the way the button does
if (params.get("autostart") === "1") form.requestSubmit();
