// The talk page: microphone -> AudioWorklet (16 kHz PCM16) -> /ws/transcribe -> transcripts,
// the agent's reply text, and its audio (one binary WAV message after each llm_response) played.
// Nothing here is fetched from anywhere but this server (the page's CSP says so too).
"use strict";

const $ = (id) => document.getElementById(id);
const talkButton = $("talk");
const statusText = $("status");
const partialText = $("partial");
const finalText = $("final");
const replyText = $("reply");
const replyAudio = $("reply-audio");
const errorText = $("error");
const log = $("log");

const TARGET_RATE_HZ = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms per binary message

// What the page did, for people and for the browser test: one event-driven record.
window.talkState = { connected: false, finals: [], replies: [], playing: 0, ended: 0, errors: [] };

let socket = null;
let capture = null; // {stream, context, node}
let replyUrl = null;

function socketUrl() {
  const own = new URLSearchParams(location.search);
  const query = new URLSearchParams();
  for (const name of ["token", "agent"]) if (own.get(name)) query.set(name, own.get(name));
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const text = query.toString();
  return `${scheme}//${location.host}/ws/transcribe${text ? "?" + text : ""}`;
}

function setStatus(text) { statusText.textContent = text; }

function showError(message) {
  errorText.textContent = message;
  window.talkState.errors.push(message);
}

function addToLog(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.textContent = text;
  log.appendChild(item);
}

function connect() {
  if (socket && (socket.readyState === WebSocket.OPEN || socket.readyState === WebSocket.CONNECTING)) {
    return Promise.resolve(socket);
  }
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(socketUrl());
    ws.binaryType = "blob";
    socket = ws;
    setStatus("connecting...");
    ws.onopen = () => resolve(ws);
    ws.onmessage = (event) => onMessage(event.data);
    ws.onerror = () => {
      // A refused handshake (a wrong ?token=, say) shows only as an error, then a close.
      reject(new Error("the connection failed: is ?token= right?"));
    };
    ws.onclose = (event) => {
      window.talkState.connected = false;
      setStatus(`disconnected${event.reason ? ": " + event.reason : ""} (code ${event.code})`);
      if (socket === ws) socket = null;
      stopCapture();
    };
  });
}

function onMessage(data) {
  if (typeof data !== "string") { playReply(data); return; }
  let message;
  try { message = JSON.parse(data); } catch (e) { showError("the server sent something that is not JSON"); return; }
  switch (message.type) {
    case "connection":
      window.talkState.connected = true;
      setStatus(capture ? "listening" : "connected");
      break;
    case "partial_transcript":
      partialText.textContent = message.text;
      break;
    case "final_transcript":
      partialText.textContent = "";
      finalText.textContent = message.text;
      window.talkState.finals.push(message.text);
      addToLog("you", message.text);
      setStatus("the agent is thinking...");
      break;
    case "llm_response":
      replyText.textContent = message.text;
      window.talkState.replies.push({ text: message.text, user_message: message.user_message });
      addToLog("agent", message.text);
      setStatus(capture ? "listening" : "connected");
      break;
    case "error":
      showError(message.message);
      break;
    default:
      break; // a message type this page does not know: newer server, older page
  }
}

function playReply(blob) {
  if (replyUrl) URL.revokeObjectURL(replyUrl);
  replyUrl = URL.createObjectURL(new Blob([blob], { type: "audio/wav" }));
  replyAudio.src = replyUrl;
  replyAudio.play().catch((e) => showError(`the reply could not be played: ${e.message}`));
}

replyAudio.addEventListener("playing", () => { window.talkState.playing += 1; });
replyAudio.addEventListener("ended", () => { window.talkState.ended += 1; });

async function startCapture() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const context = new AudioContext();
  await context.audioWorklet.addModule("/static/pcm-worklet.js");
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "pcm16-capture", {
    numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
    processorOptions: { targetRate: TARGET_RATE_HZ, chunkSamples: CHUNK_SAMPLES },
  });
  node.port.onmessage = (event) => {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(event.data);
  };
  source.connect(node);
  capture = { stream, context, node };
}

function stopCapture() {
  if (!capture) return;
  const { stream, context, node } = capture;
  capture = null;
  node.port.postMessage("stop");
  stream.getTracks().forEach((track) => track.stop());
  context.close();
  talkButton.textContent = "Talk";
  talkButton.setAttribute("aria-pressed", "false");
}

talkButton.addEventListener("click", async () => {
  errorText.textContent = "";
  if (capture) { stopCapture(); setStatus(socket ? "connected" : "not connected"); return; }
  talkButton.disabled = true;
  try {
    await connect();
    await startCapture();
    talkButton.textContent = "Stop";
    talkButton.setAttribute("aria-pressed", "true");
    setStatus("listening");
  } catch (e) {
    showError(e.message || String(e));
    stopCapture();
  } finally {
    talkButton.disabled = false;
  }
});
