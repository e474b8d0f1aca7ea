"use strict";
// The page's WebRTC transport: POST /v1/realtime/calls with the SDP offer (as OpenAI's Realtime
// API over WebRTC), Opus both ways, Realtime-API events on the "oai-events" data channel. The answer
// plays through the <audio id="answer"> element fed by the remote track: Chrome applies its echo
// cancellation to a peer connection's audio (not to Web Audio playback), so barge-in by voice works
// on laptop speakers. Barge-in itself is the server's: its VAD hears speech during an answer,
// cancels it, drops the queued audio and truncates the history to what was played.
// Uses the globals of index.html's script ($, stats, setStatus, addText, ensureTurnDiv, ...).
(function () {
  const GATHER_MS = 2000; // the offer goes out with the candidates gathered by then (no trickle)

  function waitGathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((res) => {
      const t = setTimeout(res, GATHER_MS);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(t); res(); }
      });
    });
  }

  function rtcTeardown(call) {
    clearInterval(call.timer); clearInterval(call.camTimer); clearInterval(call.outTimer);
    try { call.dc && call.dc.close(); } catch (e) {}
    try { call.pc && call.pc.close(); } catch (e) {}
    if (call.stream) call.stream.getTracks().forEach((t) => t.stop());
    if (call.ctx) call.ctx.close();
    $("video").style.display = "none";
    $("start").disabled = false;
    for (const id of ["stop", "interrupt", "endturn", "textin", "send"]) $(id).disabled = true;
    stats.ready = false;
    window.rtc = null;
  }

  window.startWebRTC = async function () {
    $("start").disabled = true;
    stats.transport = "webrtc";
    setStatus("starting (WebRTC)…");
    const call = { pc: null, dc: null, stream: null, ctx: null, timer: null, camTimer: null, outTimer: null,
                   resp: null, turn: 0, speechStoppedAt: null, location: null };
    let api = null;
    const sendEv = (ev) => { if (call.dc && call.dc.readyState === "open") call.dc.send(JSON.stringify(ev)); };
    try {
      const wantCam = $("camera").checked;
      call.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        video: wantCam ? { width: 640, height: 480 } : false,
      });
      // the level meter (the microphone's audio goes to the peer connection, not through here)
      call.ctx = new AudioContext();
      const an = call.ctx.createAnalyser();
      an.fftSize = 512;
      call.ctx.createMediaStreamSource(call.stream).connect(an);
      const lvl = new Float32Array(an.fftSize);
      const pc = call.pc = new RTCPeerConnection({ iceServers: [] }); // no public STUN server
      for (const t of call.stream.getAudioTracks()) pc.addTrack(t, call.stream);
      const ran = call.ctx.createAnalyser(); // the answer as decoded: first-audio time, seconds heard
      ran.fftSize = 1024;
      const rlvl = new Float32Array(ran.fftSize);
      pc.ontrack = (e) => {
        const el = $("answer");
        const st = e.streams && e.streams[0] ? e.streams[0] : new MediaStream([e.track]);
        el.srcObject = st; // plays it (and Chrome's echo canceller gets it as the far end)
        el.play().catch((err) => stats.errors.push({ message: "audio play: " + err }));
        call.ctx.createMediaStreamSource(st).connect(ran); // an analyser only: not played twice
      };
      call.outTimer = setInterval(() => {
        ran.getFloatTimeDomainData(rlvl);
        let peak = 0; for (const v of rlvl) peak = Math.max(peak, Math.abs(v));
        if (peak > 1e-3) {
          stats.samplesPlayed += OUT_RATE * 0.02;
          if (call.speechStoppedAt !== null) { // end of the user's speech (server VAD) -> answer heard here
            const ms = clientLatency[call.latTurn] = performance.now() - call.speechStoppedAt;
            call.speechStoppedAt = null;
            const cell = document.getElementById(`rtc-cl-${call.latTurn}`);
            if (cell) cell.textContent = ms.toFixed(0);
          }
        }
      }, 20);
      pc.onconnectionstatechange = () => {
        stats.state = "rtc-" + pc.connectionState;
        if (pc.connectionState === "failed" || pc.connectionState === "closed") {
          setStatus(`disconnected (peer connection ${pc.connectionState})`, pc.connectionState === "failed");
          rtcTeardown(call);
        }
      };
      const dc = call.dc = pc.createDataChannel("oai-events");
      dc.onmessage = (e) => { try { onEvent(JSON.parse(e.data)); } catch (err) { console.error(err); } };
      dc.onclose = () => { if (window.rtc === api) { setStatus("disconnected (the server closed the call)"); rtcTeardown(call); } };
      await pc.setLocalDescription(await pc.createOffer());
      await waitGathered(pc);
      const headers = { "Content-Type": "application/sdp" };
      if ($("token").value) headers.Authorization = "Bearer " + $("token").value;
      const r = await fetch("/v1/realtime/calls", { method: "POST", body: pc.localDescription.sdp, headers });
      const body = await r.text();
      if (r.status !== 201) {
        let msg = body;
        try { msg = JSON.parse(body).error.message; } catch (e) {}
        throw new Error(`POST /v1/realtime/calls: ${r.status}: ${msg}`);
      }
      call.location = r.headers.get("Location");
      await pc.setRemoteDescription({ type: "answer", sdp: body });
      window.rtc = api = makeApi();
      call.timer = setInterval(async () => { // meter + what the <audio> element played
        an.getFloatTimeDomainData(lvl);
        let s = 0; for (const v of lvl) s += v * v;
        $("meter").firstElementChild.style.width = Math.min(100, Math.sqrt(s / lvl.length) * 400) + "%";
        const rep = await pc.getStats();
        rep.forEach((x) => {
          if (x.type === "inbound-rtp" && x.kind === "audio") {
            stats.audioEnergy = x.totalAudioEnergy || 0;
            stats.samplesReceived = (x.totalSamplesReceived || 0) * OUT_RATE / 48000;
            stats.framesReceived = x.packetsReceived || 0;
            stats.lost = x.packetsLost || 0;
          }
          if (x.type === "outbound-rtp" && x.kind === "audio") { stats.framesSent = x.packetsSent || 0; stats.bytesSent = x.bytesSent || 0; }
        });
        stats.audioPlayedS = $("answer").currentTime;
        updateStats();
      }, 250);
      if (wantCam) {
        const v = $("video"); v.srcObject = call.stream; v.style.display = "block";
        call.camTimer = setInterval(() => grabJpeg(v).then((b64) => b64 && sendEv({ type: "input_image_buffer.append", image: b64 })), 1000);
      }
      for (const id of ["stop", "interrupt", "endturn", "textin", "send"]) $(id).disabled = false;
    } catch (err) {
      stats.errors.push({ message: String(err) }); stats.lastError = String(err);
      setStatus(`could not start: ${err}`, true);
      rtcTeardown(call);
      return;
    }

    function onEvent(m) {
      stats.events[m.type] = (stats.events[m.type] || 0) + 1;
      switch (m.type) {
        case "session.created":
          stats.ready = true; stats.state = "ready"; stats.session = m.session && m.session.id;
          setStatus(`connected over WebRTC (${call.location || "call"}) — speak!`);
          // barge-in by voice: the server's VAD interrupts the answer (or not)
          sendEv({ type: "session.update", session: { type: "realtime", audio: { input: { turn_detection: {
            type: "server_vad", interrupt_response: $("bargein").checked } } } } });
          break;
        case "input_audio_buffer.speech_started": setStatus("listening…"); break;
        case "input_audio_buffer.speech_stopped":
          call.speechStoppedAt = performance.now(); call.latTurn = call.turn; setStatus("thinking…");
          break;
        case "response.created": call.resp = m.response && m.response.id; break;
        case "response.output_audio_transcript.delta":
        case "response.audio_transcript.delta":
        case "response.output_text.delta":
        case "response.text.delta":
          addText(call.turn, m.delta);
          break;
        case "output_audio_buffer.started": setStatus("speaking…"); break;
        case "output_audio_buffer.stopped": setStatus("your turn — speak!"); break;
        case "output_audio_buffer.cleared": stats.interrupts++; ensureTurnDiv(call.turn).classList.add("interrupted"); break;
        case "response.done": {
          const st = m.response && m.response.status;
          if (st === "cancelled") ensureTurnDiv(call.turn).classList.add("interrupted");
          stats.turns++; call.turn++; turnDiv = null;
          updateStats();
          break;
        }
        case "vita.metrics": {
          const v = m.values || m.metrics || {};
          stats.metrics.push({ turn: call.turn - 1, values: v });
          const fmt = (x) => (typeof x === "number" ? x.toFixed(0) : "–");
          const tr = document.createElement("tr");
          tr.innerHTML = `<td>${call.turn - 1}</td><td>${fmt(v.ttfa_ms)}</td><td>${fmt(v.response_ms)}</td><td id="rtc-cl-${call.turn - 1}">${fmt(clientLatency[call.turn - 1])}</td>`;
          tr.title = Object.entries(v).map(([k, x]) => `${k}: ${typeof x === "number" ? x.toFixed(1) : x}`).join("\n");
          $("lat").querySelector("tbody").appendChild(tr);
          break;
        }
        case "error": {
          const e = m.error || {};
          stats.errors.push(e); stats.lastError = e.message;
          setStatus(`error: ${e.message}`, true);
          break;
        }
      }
    }

    function makeApi() { return {
      stop() {
        if (call.location) fetch(call.location + "/hangup", { method: "POST",
          headers: $("token").value ? { Authorization: "Bearer " + $("token").value } : {} }).catch(() => {});
        rtcTeardown(call); setStatus("stopped");
      },
      interrupt() { sendEv({ type: "response.cancel" }); sendEv({ type: "output_audio_buffer.clear" }); },
      endTurn() { sendEv({ type: "input_audio_buffer.commit" }); sendEv({ type: "response.create" }); },
      sendText(t) {
        sendEv({ type: "conversation.item.create", item: { type: "message", role: "user", content: [{ type: "input_text", text: t }] } });
        sendEv({ type: "response.create" });
      },
    }; }
  };

  async function grabJpeg(v) {
    if (!v.videoWidth || !stats.ready) return null;
    const scale = Math.min(1, 448 / Math.max(v.videoWidth, v.videoHeight));
    const c = $("canvas");
    c.width = Math.round(v.videoWidth * scale); c.height = Math.round(v.videoHeight * scale);
    c.getContext("2d").drawImage(v, 0, 0, c.width, c.height);
    const url = c.toDataURL("image/jpeg", 0.6); // a data channel message stays well under 64 kB
    stats.imagesSent++;
    return url.slice(url.indexOf(",") + 1);
  }
})();
