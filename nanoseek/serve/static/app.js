// The chat page of `nanoseek serve --ui`, over this server's OpenAI API.
// Model output only ever reaches the page through textContent: it is shown as text, never parsed as HTML.
"use strict";

const KEY_STORAGE = "nanoseek.apiKey";  // sessionStorage: gone when the tab closes
const $ = (id) => document.getElementById(id);

let conversation = [];  // {role, content} turns sent with each request; this tab's memory is the only copy
let running = null;     // the AbortController of the answer being streamed

// ------------------------------------------------------------ HTTP
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not the OpenAI error shape */ }
  return `the server answered HTTP ${response.status}`;
}

// The data payloads of a server-sent event stream, until [DONE].
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { reader.cancel(); return; }
        yield JSON.parse(data);
      }
    }
  }
}

// ------------------------------------------------------------ API key
function askForKey(reason) {
  const dialog = $("key-dialog"), error = $("key-error");
  error.textContent = reason || "";
  error.hidden = !reason;
  $("key-input").value = "";
  return new Promise((resolve) => {
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
      dialog.close();
      resolve();
    };
    dialog.showModal();
  });
}

// An API call that asks for a key (again) while the server answers 401.
async function call(url, options = {}) {
  for (;;) {
    const response = await fetch(url, options);
    if (response.status !== 401) return response;
    const reason = await errorMessage(response);
    await askForKey(sessionStorage.getItem(KEY_STORAGE) ? reason : null);  // no key yet: nothing is wrong
    options = { ...options, headers: { ...options.headers, ...headers(false) } };
  }
}

// ------------------------------------------------------------ page state
function showStatus(text) {
  $("status").textContent = text;
  $("status").hidden = !text;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = busy;
  if (!busy) $("prompt").focus();
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

async function loadModels() {
  let response;
  try {
    response = await call("/v1/models", { headers: headers(false) });
  } catch (e) {
    showStatus(`Cannot reach the server (${e.message}).`);
    return;
  }
  if (!response.ok) { showStatus(await errorMessage(response)); return; }
  const select = $("model");
  select.replaceChildren();
  for (const model of (await response.json()).data) {
    const route = model.route || model.owned_by;
    const option = document.createElement("option");
    option.value = model.id;
    option.dataset.route = route;
    option.textContent = `${model.id} (${route})`;
    select.append(option);
  }
  showStatus("");
}

function addUserMessage(text) {
  const view = $("user-template").content.firstElementChild.cloneNode(true);
  view.querySelector(".content").textContent = text;
  $("messages").append(view);
}

// ------------------------------------------------------------ one answer
class Answer {
  constructor(model, route) {
    this.view = $("answer-template").content.firstElementChild.cloneNode(true);
    this.view.querySelector(".model-name").textContent = `${model} · ${route}`;
    this.view.classList.add("streaming");
    this.reasoning = this.view.querySelector(".reasoning");
    this.reasoningText = this.view.querySelector(".reasoning-text");
    this.content = this.view.querySelector(".content");
    this.note = this.view.querySelector(".note");
    this.text = "";
    this.requestId = null;
    $("messages").append(this.view);
    scrollToEnd();
  }

  addReasoning(text) {
    this.reasoning.hidden = false;
    this.reasoning.querySelector("summary").textContent = "Thinking…";
    this.reasoningText.textContent += text;
    scrollToEnd();
  }

  addContent(text) {
    this.reasoning.querySelector("summary").textContent = "Reasoning";
    this.text += text;
    this.content.textContent = this.text;
    scrollToEnd();
  }

  showNote(text, isError) {
    this.note.textContent = text;
    this.note.hidden = false;
    this.note.classList.toggle("error", Boolean(isError));
  }

  finish(finishReason) {
    this.reasoning.querySelector("summary").textContent = "Reasoning";
    if (finishReason === "length") this.showNote("Cut at the max tokens limit.");
    if (this.requestId) this.offerFeedback();
    this.view.dataset.requestId = this.requestId || "";
    this.view.classList.replace("streaming", "finished");
  }

  // Thumbs up or down (ratings 5 and 1 of /v1/feedback's 1..5) and a comment, for this request id.
  offerFeedback() {
    const box = this.view.querySelector(".feedback");
    const thumbs = box.querySelectorAll(".thumb"), send = box.querySelector(".send-feedback");
    const status = box.querySelector(".feedback-status");
    let rating = null;
    for (const thumb of thumbs) {
      thumb.onclick = () => {
        rating = thumb.classList.contains("up") ? 5 : 1;
        for (const t of thumbs) t.setAttribute("aria-pressed", String(t === thumb));
        send.disabled = false;
      };
    }
    send.onclick = async () => {
      send.disabled = true;
      const body = { request_id: this.requestId, rating, comment: box.querySelector(".comment").value };
      try {
        const response = await call("/v1/feedback", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
        if (response.ok) {
          status.textContent = "Thank you: feedback saved.";
          for (const control of box.querySelectorAll("button, input")) control.disabled = true;  // once per answer
        } else {
          status.textContent = await errorMessage(response);
          send.disabled = false;
        }
      } catch (e) {
        status.textContent = `Not sent (${e.message}).`;
        send.disabled = false;
      }
    };
    box.hidden = false;
  }
}

// ------------------------------------------------------------ a turn
async function ask(text) {
  const option = $("model").selectedOptions[0];
  if (!option) { showStatus("No model to ask: the model list did not load."); return; }
  const turns = conversation;  // "New chat" during the stream starts another list
  turns.push({ role: "user", content: text });
  addUserMessage(text);
  const answer = new Answer(option.value, option.dataset.route);
  const body = { model: option.value, messages: turns.slice(), stream: true };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;

  running = new AbortController();
  setBusy(true);
  let finishReason = null;
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    answer.requestId = response.headers.get("X-Request-Id");  // the id this server issued
    for await (const chunk of sseData(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      answer.requestId = answer.requestId || chunk.id;
      const choice = (chunk.choices || []).find((c) => c.index === 0);
      if (!choice) continue;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;  // DeepSeek's name, then vLLM's
      if (reasoning) answer.addReasoning(reasoning);
      if (delta.content) answer.addContent(delta.content);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") answer.showNote("Stopped.");
    else answer.showNote(e.message, true);
  } finally {
    running = null;
    setBusy(false);
  }
  // Earlier reasoning is not sent back (DeepSeek's advice for multi-turn R1 chats).
  if (answer.text) turns.push({ role: "assistant", content: answer.text });
  else turns.pop();  // no answer: the question is not part of the conversation the model sees
  answer.finish(finishReason);
}

// ------------------------------------------------------------ wiring
function start() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    $("prompt").value = "";
    ask(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (running) running.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (running) running.abort();
    conversation = [];
    for (const message of document.querySelectorAll("#messages .msg")) message.remove();
    $("prompt").focus();
  });
  $("key-dialog").addEventListener("cancel", (event) => event.preventDefault());  // a key is needed
  loadModels();
}

start();
