// The digit page: draw on a canvas (Pointer Events), or pick/take a photo; POST it to /v1/classify; show the answer.
// Plain JavaScript, no dependencies, nothing inline (the server sends a strict Content-Security-Policy).
// Test hooks: #label holds the digit or "not a digit"; document.body.dataset.state is idle | busy | done | error
// (loading until this script has set the page up);
// document.body.dataset.lastLatencyMs is the time from the stroke's end (or the file's choice) to the label shown.
"use strict";

(function () {
  const CLASSIFY_URL = "/v1/classify?top_k=10&return_inputs=true";
  const TOKEN_KEY = "lsoftmax-serve.token";
  const INK = "#ffffff";
  const PAPER = "#000000";
  const PEN_WIDTH = 20; // canvas pixels on a 280-pixel pad: about MNIST's stroke for a digit drawn full height

  const body = document.body;
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const hint = document.getElementById("pad-hint");
  const labelOut = document.getElementById("label");
  const answerBox = labelOut.closest(".answer");
  const summary = document.getElementById("summary");
  const errorBox = document.getElementById("error");
  const barsList = document.getElementById("bars");
  const seen = document.getElementById("seen");
  const seenCtx = seen.getContext("2d");
  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token");
  const modelLine = document.getElementById("model");

  let sequence = 0; // the latest request; older answers are dropped
  let inFlight = null; // AbortController of the latest request
  let lastRequest = null; // {body, type, started} to send again once a token is given
  let showingPhoto = false; // the pad shows an uploaded photo: the next stroke starts on a clean pad

  function setState(state) {
    body.dataset.state = state;
    body.setAttribute("aria-busy", state === "busy" ? "true" : "false");
  }

  // ---------------------------------------------------------------- the probability bars
  const bars = [];
  for (let digit = 0; digit < 10; digit += 1) {
    const item = document.createElement("li");
    item.className = "bar";
    const name = document.createElement("span");
    name.className = "bar-digit";
    name.textContent = String(digit);
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = "";
    item.append(name, track, value);
    barsList.appendChild(item);
    bars.push({ item, fill, value });
  }

  function percent(p) {
    if (p >= 0.995) return "100%";
    if (p >= 0.1) return Math.round(p * 100) + "%";
    if (p >= 0.001) return (p * 100).toFixed(1) + "%";
    return p > 0 ? "<0.1%" : "0%";
  }

  function showBars(topK, best, rejected) {
    const probability = new Array(10).fill(0);
    for (const entry of topK || []) {
      const label = entry.label || 0;
      if (label >= 0 && label < 10) probability[label] = entry.probability || 0;
    }
    bars.forEach((bar, digit) => {
      const p = probability[digit];
      bar.fill.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(2) + "%"; // CSSOM: allowed by the CSP
      bar.value.textContent = percent(p);
      bar.item.classList.toggle("best", digit === best);
      bar.item.classList.toggle("rejected", rejected);
      bar.item.setAttribute("aria-label", digit + ": " + percent(p));
    });
  }

  function resetBars() {
    bars.forEach((bar) => {
      bar.fill.style.width = "0%";
      bar.value.textContent = "";
      bar.item.classList.remove("best", "rejected");
      bar.item.removeAttribute("aria-label");
    });
  }

  // ---------------------------------------------------------------- the 28x28 the model saw
  function clearSeen() {
    seenCtx.fillStyle = PAPER;
    seenCtx.fillRect(0, 0, seen.width, seen.height);
  }

  function showSeen(base64) {
    if (!base64) {
      clearSeen();
      return;
    }
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    if (bytes.length !== 28 * 28) {
      clearSeen();
      return;
    }
    const image = seenCtx.createImageData(28, 28);
    for (let i = 0; i < bytes.length; i += 1) {
      image.data[4 * i] = bytes[i];
      image.data[4 * i + 1] = bytes[i];
      image.data[4 * i + 2] = bytes[i];
      image.data[4 * i + 3] = 255;
    }
    seenCtx.putImageData(image, 0, 0);
  }

  // ---------------------------------------------------------------- showing answers and errors
  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    setState("error");
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function showResult(answer, started) {
    const result = (answer.results || [])[0];
    if (!result) {
      showError("The server answered without a result.");
      return;
    }
    const best = result.label || 0;
    const rejected = Boolean(result.rejected);
    const probability = result.probability || 0;
    labelOut.textContent = rejected ? "not a digit" : String(best);
    labelOut.classList.toggle("rejected", rejected);
    labelOut.classList.remove("empty");
    answerBox.classList.toggle("rejected", rejected);
    summary.textContent = rejected
      ? "This does not look like a handwritten digit (closest: " + best + ", " + percent(probability) + ")."
      : percent(probability) + " sure it is a " + best + ".";
    showBars(result.topK, best, rejected);
    showSeen(result.modelInput);
    if (answer.modelName) {
      modelLine.textContent = "Model " + answer.modelName + (answer.modelVersion ? " v" + answer.modelVersion : "");
    }
    clearError();
    body.dataset.lastLatencyMs = String(Math.round(performance.now() - started));
    setState("done");
  }

  // ---------------------------------------------------------------- talking to the server
  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function askForToken(message) {
    tokenForm.hidden = false;
    showError(message);
    tokenInput.focus();
  }

  async function classify(payload, type, started) {
    sequence += 1;
    const mine = sequence;
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    lastRequest = { payload, type, started };
    setState("busy");
    const headers = { "Content-Type": type || "application/octet-stream" };
    const token = storedToken();
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    let answer = null;
    try {
      const data = await payload; // a Blob, or a promise of one (the canvas's PNG)
      if (mine !== sequence) return;
      response = await fetch(CLASSIFY_URL, {
        method: "POST", headers, body: data, signal: controller.signal, cache: "no-store",
      });
      const text = await response.text();
      try {
        answer = text ? JSON.parse(text) : null;
      } catch (e) {
        answer = null;
      }
    } catch (e) {
      if (mine !== sequence || e.name === "AbortError") return;
      showError("Could not reach the server: " + (e.message || e));
      return;
    }
    if (mine !== sequence) return;
    inFlight = null;
    if (response.status === 401) {
      if (token) {
        try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* storage unavailable */ }
        askForToken("The token was not accepted; enter it again.");
      } else {
        askForToken("This server needs an access token: enter it below.");
      }
      return;
    }
    if (!response.ok) {
      const message = answer && answer.error ? answer.error : response.statusText || "request failed";
      showError("Error " + response.status + ": " + message);
      return;
    }
    if (!answer) {
      showError("The server's answer was not JSON.");
      return;
    }
    showResult(answer, started);
  }

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = tokenInput.value.trim();
    if (!token) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (e) {
      showError("This browser does not allow session storage; the token cannot be kept.");
      return;
    }
    tokenInput.value = "";
    tokenForm.hidden = true;
    clearError();
    if (lastRequest) classify(lastRequest.payload, lastRequest.type, performance.now());
    else setState("idle");
  });

  // ---------------------------------------------------------------- the drawing pad
  function paintPaper() {
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, pad.width, pad.height);
    ctx.restore();
  }

  // The pad as a PNG Blob. toDataURL encodes right away (a few ms for 280x280); Chrome runs toBlob's encoding in
  // idle time and may start it only a second later while input keeps the page busy.
  function padPNG() {
    const url = pad.toDataURL("image/png");
    const binary = atob(url.slice(url.indexOf(",") + 1));
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
    return Promise.resolve(new Blob([bytes], { type: "image/png" }));
  }

  function point(event) {
    const box = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * pad.width) / box.width,
      y: ((event.clientY - box.top) * pad.height) / box.height,
    };
  }

  let drawing = null; // {id, last}

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, PEN_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fillStyle = INK;
    ctx.fill();
  }

  function line(from, to) {
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.strokeStyle = INK;
    ctx.lineWidth = PEN_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.stroke();
  }

  pad.addEventListener("pointerdown", (event) => {
    if (drawing || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    if (showingPhoto) {
      paintPaper();
      showingPhoto = false;
    }
    hint.hidden = true;
    pad.setPointerCapture(event.pointerId);
    const p = point(event);
    drawing = { id: event.pointerId, last: p };
    dot(p);
  });

  pad.addEventListener("pointermove", (event) => {
    if (!drawing || event.pointerId !== drawing.id) return;
    event.preventDefault();
    const events = typeof event.getCoalescedEvents === "function" ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) {
      const p = point(e);
      line(drawing.last, p);
      drawing.last = p;
    }
  });

  function endStroke(event) {
    if (!drawing || event.pointerId !== drawing.id) return;
    const started = performance.now();
    const p = point(event);
    if (event.type === "pointerup") line(drawing.last, p);
    drawing = null;
    if (pad.hasPointerCapture(event.pointerId)) pad.releasePointerCapture(event.pointerId);
    classify(padPNG(), "image/png", started);
  }

  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);
  pad.addEventListener("contextmenu", (event) => event.preventDefault());

  function clearAll() {
    sequence += 1; // an answer still on its way is for a drawing that is gone
    if (inFlight) inFlight.abort();
    inFlight = null;
    lastRequest = null;
    drawing = null;
    showingPhoto = false;
    paintPaper();
    hint.hidden = false;
    labelOut.textContent = "–";
    labelOut.classList.remove("rejected");
    labelOut.classList.add("empty");
    answerBox.classList.remove("rejected");
    summary.textContent = "Draw a digit to see what the model reads.";
    resetBars();
    clearSeen();
    clearError();
    setState("idle");
  }

  document.getElementById("clear").addEventListener("click", clearAll);
  document.addEventListener("keydown", (event) => {
    // Escape clears, except while typing (the token field).
    if (event.key === "Escape" && !event.target.closest("input:not([type=file]), textarea")) clearAll();
  });

  // ---------------------------------------------------------------- photos
  function showPhoto(file, request) {
    if (typeof createImageBitmap !== "function") return;
    createImageBitmap(file).then((bitmap) => {
      if (request !== sequence || drawing) { // drawn on or cleared meanwhile: the pad is the user's again
        bitmap.close();
        return;
      }
      paintPaper();
      const scale = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      ctx.drawImage(bitmap, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      bitmap.close();
      showingPhoto = true;
      hint.hidden = true;
    }, () => { /* not an image the browser can show: the server says what it makes of it */ });
  }

  function onFile(event) {
    const input = event.target;
    const file = input.files && input.files[0];
    if (!file) return;
    const started = performance.now();
    classify(Promise.resolve(file), file.type || "application/octet-stream", started);
    hint.hidden = true;
    showPhoto(file, sequence);
    input.value = ""; // choosing the same file again fires change again
  }

  document.getElementById("upload").addEventListener("change", onFile);
  document.getElementById("camera").addEventListener("change", onFile);

  paintPaper();
  clearSeen();
  setState("idle");
})();
