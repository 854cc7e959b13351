// kotonoha web UI: Chat, Playground, Arena and Inside over the server's own API.
// Plain browser JavaScript, no build step and no network access beyond this server.
"use strict";

// ---------------------------------------------------------------- i18n

const MESSAGES = {
  en: {
    "tab.chat": "Chat", "tab.playground": "Playground", "tab.arena": "Arena", "tab.inside": "Inside",
    "inside.intro": "Look inside the model: the logit lens shows the next-token prediction after every layer; attention shows where each head looks.",
    "inside.text": "Text", "inside.answer": "Answer to follow (lens)", "inside.run_lens": "Logit lens",
    "inside.run_attention": "Attention", "inside.layer": "Layer", "inside.top": "Top next tokens",
    "inside.rank": "Rank", "inside.head": "Head {h}", "inside.word": "Word",
    "inside.run_neighbours": "Nearest words", "inside.cosine": "Cosine",
    "inside.neighbours_hint": "The closest rows of the input embedding table (a word split into several tokens is the mean of their rows).",
    "inside.lens_hint": "Layer 0 is the embeddings; each later row applies the final norm and output head to the residual stream after that block.",
    "inside.attention_hint": "Rows are the tokens that look (queries), columns the tokens they look at (keys); darker = more attention. Hover a cell for its weight.",
    "lang": "Language", "model": "Model", "send": "Send", "stop": "Stop",
    "auth.button": "API key", "auth.prompt": "This server needs an API key.", "auth.save": "Save",
    "chat.new": "New chat", "chat.history": "Conversations", "chat.settings": "Settings",
    "chat.system": "System prompt", "chat.system_ph": "e.g. You are a concise assistant.",
    "chat.empty": "Start a conversation below.", "chat.input_ph": "Send a message…",
    "chat.user": "You", "chat.assistant": "Assistant", "chat.edit": "Edit",
    "chat.save_send": "Save & send", "chat.cancel": "Cancel", "chat.regenerate": "Regenerate",
    "chat.good": "Good answer", "chat.bad": "Bad answer", "chat.comment": "Comment",
    "chat.comment_ph": "What was good or bad about it?", "chat.save": "Save",
    "chat.saved": "Saved", "chat.delete": "Delete conversation", "chat.stopped": "stopped",
    "chat.truncated": "cut at max tokens", "chat.untitled": "New chat",
    "p.temperature": "Temperature", "p.top_p": "Top-p", "p.top_k": "Top-k (0 = off)",
    "p.min_p": "Min-p", "p.max_tokens": "Max tokens", "p.seed": "Seed",
    "p.seed_ph": "random", "p.stop": "Stop sequences (one per line)",
    "p.presence": "Presence penalty", "p.frequency": "Frequency penalty",
    "p.repetition": "Repetition penalty", "p.alternatives": "Top alternatives shown",
    "p.logit_bias": "Logit bias (JSON: {\"token id\": bias})",
    "pg.prompt": "Prompt", "pg.prompt_ph": "Type the beginning of a text…", "pg.run": "Generate",
    "pg.legend": "Token probability:", "pg.hint": "Hover or click a token for its alternatives.",
    "pg.echo": "Also score the prompt", "pg.token": "Token", "pg.prob": "Probability",
    "pg.done": "{n} tokens, finish reason: {reason}",
    "pg.stopped": "the stop sequence: sampled, but not part of the text", "pg.bad_bias": "Logit bias must be a JSON object.",
    "arena.intro": "Two anonymous models answer the same prompt. Vote for the better answer; their names are revealed after you vote.",
    "arena.prompt_ph": "Ask both models something…", "arena.model_a": "Model A",
    "arena.model_b": "Model B", "arena.a_better": "A is better", "arena.b_better": "B is better",
    "arena.tie": "Tie", "arena.both_bad": "Both are bad", "arena.leaderboard": "Leaderboard",
    "arena.board_hint": "Bradley–Terry rating with a bootstrap 95% interval, and online Elo.",
    "arena.rating": "Rating (BT)", "arena.ci": "95% interval", "arena.elo": "Elo",
    "arena.battles": "Battles", "arena.wlt": "W / L / T", "arena.votes": "{n} votes so far.", "arena.votes_one": "1 vote so far.",
    "arena.thanks": "Thanks! A was {a}, B was {b}.", "arena.need_two": "The arena needs a server with at least two models.",
  },
  ja: {
    "tab.chat": "チャット", "tab.playground": "プレイグラウンド", "tab.arena": "アリーナ", "tab.inside": "内部",
    "inside.intro": "モデルの内部を見る：ロジットレンズは各層での次トークン予測を、アテンションは各ヘッドがどこを見ているかを示します。",
    "inside.text": "テキスト", "inside.answer": "追跡する答え（レンズ）", "inside.run_lens": "ロジットレンズ",
    "inside.run_attention": "アテンション", "inside.layer": "層", "inside.top": "次トークンの上位",
    "inside.rank": "順位", "inside.head": "ヘッド {h}", "inside.word": "単語",
    "inside.run_neighbours": "近い単語", "inside.cosine": "コサイン類似度",
    "inside.neighbours_hint": "入力埋め込み表で最も近い行（複数トークンに分かれる単語はその行の平均）。",
    "inside.lens_hint": "層 0 は埋め込み。以降の各行は、そのブロックの後の残差ストリームに最終正規化と出力ヘッドをかけたものです。",
    "inside.attention_hint": "行は見る側のトークン（クエリ）、列は見られる側（キー）。濃いほど注意が大きい。セルにマウスを置くと重みを表示します。",
    "lang": "言語", "model": "モデル", "send": "送信", "stop": "停止",
    "auth.button": "APIキー", "auth.prompt": "このサーバーにはAPIキーが必要です。", "auth.save": "保存",
    "chat.new": "新しいチャット", "chat.history": "会話履歴", "chat.settings": "設定",
    "chat.system": "システムプロンプト", "chat.system_ph": "例：あなたは簡潔に答えるアシスタントです。",
    "chat.empty": "下の欄から会話を始めましょう。", "chat.input_ph": "メッセージを入力…",
    "chat.user": "あなた", "chat.assistant": "アシスタント", "chat.edit": "編集",
    "chat.save_send": "保存して送信", "chat.cancel": "キャンセル", "chat.regenerate": "再生成",
    "chat.good": "良い回答", "chat.bad": "悪い回答", "chat.comment": "コメント",
    "chat.comment_ph": "良かった点・悪かった点は？", "chat.save": "保存",
    "chat.saved": "保存しました", "chat.delete": "会話を削除", "chat.stopped": "停止しました",
    "chat.truncated": "最大トークン数で打ち切り", "chat.untitled": "新しいチャット",
    "p.temperature": "温度", "p.top_p": "Top-p", "p.top_k": "Top-k（0で無効）",
    "p.min_p": "Min-p", "p.max_tokens": "最大トークン数", "p.seed": "シード",
    "p.seed_ph": "ランダム", "p.stop": "停止文字列（1行に1つ）",
    "p.presence": "存在ペナルティ", "p.frequency": "頻度ペナルティ",
    "p.repetition": "繰り返しペナルティ", "p.alternatives": "表示する候補の数",
    "p.logit_bias": "ロジットバイアス（JSON：{\"トークンID\": 値}）",
    "pg.prompt": "プロンプト", "pg.prompt_ph": "文章の書き出しを入力…", "pg.run": "生成",
    "pg.legend": "トークンの確率：", "pg.hint": "トークンにカーソルを合わせるかクリックすると候補が表示されます。",
    "pg.echo": "プロンプトの確率も表示", "pg.token": "トークン", "pg.prob": "確率",
    "pg.done": "{n}トークン、終了理由：{reason}",
    "pg.stopped": "停止シーケンス：生成されたが、テキストには含まれない", "pg.bad_bias": "ロジットバイアスはJSONオブジェクトで指定してください。",
    "arena.intro": "匿名の2つのモデルが同じプロンプトに答えます。良い方に投票すると、モデル名が明かされます。",
    "arena.prompt_ph": "両方のモデルに質問してみましょう…", "arena.model_a": "モデルA",
    "arena.model_b": "モデルB", "arena.a_better": "Aが良い", "arena.b_better": "Bが良い",
    "arena.tie": "引き分け", "arena.both_bad": "どちらも悪い", "arena.leaderboard": "ランキング",
    "arena.board_hint": "Bradley–Terryレーティング（ブートストラップ95%区間）とオンラインElo。",
    "arena.rating": "レーティング（BT）", "arena.ci": "95%区間", "arena.elo": "Elo",
    "arena.battles": "対戦数", "arena.wlt": "勝 / 敗 / 分", "arena.votes": "これまでの投票：{n}件", "arena.votes_one": "これまでの投票：1件",
    "arena.thanks": "投票ありがとうございます。Aは{a}、Bは{b}でした。", "arena.need_two": "アリーナには2つ以上のモデルを読み込んだサーバーが必要です。",
  },
};

let lang = localStorage.getItem("kotonoha.lang") || (navigator.language || "en").slice(0, 2);
if (!MESSAGES[lang]) lang = "en";

function t(key, vars = {}) {
  const text = MESSAGES[lang][key] ?? MESSAGES.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

function applyLanguage() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => {
    el.textContent = t(el.dataset.i18n, el.dataset.i18nVars ? JSON.parse(el.dataset.i18nVars) : {});
  });
  document.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = t(el.dataset.i18nTitle); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  });
  $("#lang").value = lang;
  renderChat();  // dynamic labels
  renderConversationList();
  renderArenaResult();
  if (document.body.dataset.ready) loadLeaderboard();
}

// ---------------------------------------------------------------- small helpers

const $ = (selector, root = document) => root.querySelector(selector);

// Thumb icons as inline SVG: emoji need a colour-emoji font that a server may not have.
const THUMB_PATH = "M2 10h4v11H2zM8 21h9.3a2 2 0 0 0 2-1.6l1.6-7A2 2 0 0 0 19 10h-5.6l.9-4.2"
  + "a1.5 1.5 0 0 0-.4-1.4L13 3.5 8 9z";

function thumbIcon(down) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "16");
  svg.setAttribute("height", "16");
  svg.setAttribute("aria-hidden", "true");
  if (down) svg.setAttribute("transform", "rotate(180)");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", THUMB_PATH);
  path.setAttribute("fill", "currentColor");
  svg.append(path);
  return svg;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// An element whose text follows the language switch: applyLanguage re-translates every
// [data-i18n] (with its variables), so tables and statuses drawn earlier change language too.
function label(tag, key, vars = null, attrs = {}) {
  return setLabel(el(tag, attrs), key, vars);
}

function setLabel(node, key, vars = null) {
  node.dataset.i18n = key;
  if (vars) node.dataset.i18nVars = JSON.stringify(vars);
  else delete node.dataset.i18nVars;
  node.textContent = t(key, vars || {});
  return node;
}

function showError(message) {
  const bar = $("#error-bar");
  bar.textContent = message;
  bar.classList.toggle("hidden", !message);
  if (message) setTimeout(() => { if (bar.textContent === message) showError(""); }, 8000);
}

function numberOr(id, fallback) {
  const v = $(id).value.trim();
  return v === "" ? fallback : Number(v);
}

function lines(id) {
  return $(id).value.split("\n").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
}

// ---------------------------------------------------------------- talking to the server

let apiKey = localStorage.getItem("kotonoha.apiKey") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) askForKey();
  if (!response.ok) {
    const error = new Error(await errorMessage(response));
    error.status = response.status;
    throw error;
  }
  return response.json();
}

// An event handler that shows its failure instead of dropping it (a 404, the network).
function shown(handler) {
  return (...args) => handler(...args).catch((e) => showError(e.message));
}

// POST `body` and yield each JSON object of the server-sent-events reply.
async function* stream(path, body, signal) {
  const response = await fetch(path, {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (response.status === 401) askForKey();
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        yield obj;
      }
    }
  }
}

function askForKey() {
  $("#key-dialog").classList.remove("hidden");
  $("#key-input").focus();
}

// ---------------------------------------------------------------- tabs and models

let models = [];

function showTab(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("hidden", p.id !== `page-${name}`));
  if (name === "arena") loadLeaderboard();
  localStorage.setItem("kotonoha.tab", name);
}

async function loadModels() {
  models = (await api("/v1/models")).data;
  const fill = (select, list) => {
    const previous = select.value;
    select.replaceChildren(...list.map((m) => el("option", { value: m.id }, m.id)));
    if (list.some((m) => m.id === previous)) select.value = previous;
  };
  const chatModels = models.filter((m) => m.chat);
  fill($("#chat-model"), chatModels.length ? chatModels : models);
  fill($("#pg-model"), models);
  fill($("#inside-model"), models);
}

// ---------------------------------------------------------------- chat

const chat = {
  conversations: [],
  conversation: null,   // the open conversation, or null for a new one
  messages: new Map(),  // id -> message (every branch)
  leaf: null,           // id of the last message shown
  streaming: null,      // {text, parentId} while an answer streams in
  controller: null,
  editing: null,        // id of the user message being edited
  commenting: null,     // id of the answer whose comment box is open
};

function chatParams() {
  const params = {
    temperature: numberOr("#chat-temperature", 0.8),
    top_p: numberOr("#chat-top-p", 1),
    max_tokens: numberOr("#chat-max-tokens", 128),
    stop: lines("#chat-stop"),
  };
  const seed = numberOr("#chat-seed", null);
  if (seed !== null) params.seed = seed;
  return params;
}

async function loadConversations() {
  chat.conversations = await api("/ui/api/conversations");
  renderConversationList();
}

function renderConversationList() {
  const list = $("#conversation-list");
  list.replaceChildren(...chat.conversations.map((c) => el("li",
    { class: chat.conversation?.id === c.id ? "active" : "", "data-id": c.id },
    el("button", { class: "open", title: c.title, onclick: shown(() => openConversation(c.id)) },
      c.title || t("chat.untitled")),
    el("button", {
      class: "delete", title: t("chat.delete"), "aria-label": t("chat.delete"),
      onclick: shown(() => deleteConversation(c.id)),
    }, "×"))));
}

async function openConversation(id) {
  chat.controller?.abort();  // an answer still streaming belongs to the conversation we leave
  const { conversation, messages } = await api(`/ui/api/conversations/${id}`);
  chat.conversation = conversation;
  chat.messages = new Map(messages.map((m) => [m.id, m]));
  chat.leaf = conversation.current_leaf;
  chat.editing = chat.commenting = null;
  $("#chat-system").value = conversation.system_prompt || "";
  if (conversation.model && [...$("#chat-model").options].some((o) => o.value === conversation.model)) {
    $("#chat-model").value = conversation.model;
  }
  renderConversationList();
  renderChat();
}

function newConversation() {
  chat.controller?.abort();
  chat.conversation = null;
  chat.messages = new Map();
  chat.leaf = null;
  chat.editing = chat.commenting = null;
  renderConversationList();
  renderChat();
  $("#chat-input").focus();
}

async function deleteConversation(id) {
  await api(`/ui/api/conversations/${id}`, { method: "DELETE" });
  if (chat.conversation?.id === id) newConversation();
  await loadConversations();
}

// The messages from the root to the current leaf.
function currentPath() {
  const path = [];
  for (let id = chat.leaf; id; id = chat.messages.get(id)?.parent_id) {
    const m = chat.messages.get(id);
    if (!m) break;
    path.unshift(m);
  }
  return path;
}

function siblingsOf(message) {
  return [...chat.messages.values()].filter(
    (m) => m.parent_id === message.parent_id && m.role === message.role);
}

// Show another branch: the sibling and, below it, its most recent descendants.
async function switchTo(message) {
  let leaf = message;
  for (;;) {
    const children = [...chat.messages.values()].filter((m) => m.parent_id === leaf.id);
    if (!children.length) break;
    leaf = children[children.length - 1];
  }
  chat.leaf = leaf.id;
  renderChat();
  try {
    await api(`/ui/api/conversations/${chat.conversation.id}`,
      { method: "PATCH", body: { current_leaf: leaf.id } });
  } catch (e) {
    await openConversation(chat.conversation.id);  // back to what the server has
    throw e;
  }
}

function renderMessage(m) {
  const isUser = m.role === "user";
  const node = el("div", { class: `msg ${m.role}`, "data-id": m.id, "data-role": m.role });
  const siblings = siblingsOf(m);
  const role = el("div", { class: "role" }, isUser ? t("chat.user") : `${t("chat.assistant")} · ${m.model || ""}`);
  if (siblings.length > 1) {
    const i = siblings.findIndex((s) => s.id === m.id);
    role.append(el("span", { class: "siblings" },
      el("button", { class: "ghost prev", disabled: i === 0, onclick: shown(() => switchTo(siblings[i - 1])) }, "‹"),
      el("span", { class: "position" }, `${i + 1} / ${siblings.length}`),
      el("button", { class: "ghost next", disabled: i === siblings.length - 1, onclick: shown(() => switchTo(siblings[i + 1])) }, "›")));
  }
  node.append(role);

  if (isUser && chat.editing === m.id) {
    const box = el("textarea", { class: "edit-box", rows: 3 });
    box.value = m.content;
    node.append(box, el("div", { class: "actions" },
      el("button", { class: "primary save-edit", onclick: () => {
        chat.editing = null;
        sendChat({ content: box.value, parentId: m.parent_id });
      } }, t("chat.save_send")),
      el("button", { onclick: () => { chat.editing = null; renderChat(); } }, t("chat.cancel"))));
    return node;
  }
  node.append(el("div", { class: "content" }, m.content));
  const busy = chat.streaming !== null;
  if (isUser) {
    node.append(el("div", { class: "actions" },
      el("button", { class: "edit", disabled: busy, onclick: () => { chat.editing = m.id; renderChat(); } }, t("chat.edit"))));
    return node;
  }
  const rate = (value) => setFeedback(m, m.rating === value ? 0 : value, m.comment || "");
  const actions = el("div", { class: "actions" },
    el("button", { class: `thumb-up ${m.rating === 1 ? "on" : ""}`, title: t("chat.good"), "aria-label": t("chat.good"), onclick: () => rate(1) }, thumbIcon(false)),
    el("button", { class: `thumb-down ${m.rating === -1 ? "on" : ""}`, title: t("chat.bad"), "aria-label": t("chat.bad"), onclick: () => rate(-1) }, thumbIcon(true)),
    el("button", { class: "comment", onclick: () => { chat.commenting = chat.commenting === m.id ? null : m.id; renderChat(); } }, t("chat.comment")),
    el("button", { class: "regenerate", disabled: busy, onclick: () => sendChat({ parentId: m.parent_id, regenerate: true }) }, t("chat.regenerate")));
  if (m.finish_reason === "abort") actions.append(el("span", { class: "note" }, t("chat.stopped")));
  if (m.finish_reason === "length") actions.append(el("span", { class: "note" }, t("chat.truncated")));
  if (m.comment) actions.append(el("span", { class: "note" }, `“${m.comment}”`));
  node.append(actions);
  if (chat.commenting === m.id) {
    const input = el("input", { class: "comment-input", type: "text", placeholder: t("chat.comment_ph") });
    input.value = m.comment || "";
    node.append(el("div", { class: "comment-row" }, input,
      el("button", { class: "primary save-comment", onclick: () => { chat.commenting = null; setFeedback(m, m.rating || 0, input.value); } }, t("chat.save"))));
  }
  return node;
}

function renderChat() {
  const box = $("#messages");
  const path = currentPath();
  const nodes = path.map(renderMessage);
  if (chat.streaming) {
    nodes.push(el("div", { class: "msg assistant streaming", "data-role": "assistant" },
      el("div", { class: "role" }, `${t("chat.assistant")} · ${$("#chat-model").value}`),
      el("div", { class: "content" }, chat.streaming.text)));
  }
  if (!nodes.length) nodes.push(el("div", { class: "empty", id: "chat-empty" }, t("chat.empty")));
  box.replaceChildren(...nodes);
  box.scrollTop = box.scrollHeight;
  $("#chat-send").classList.toggle("hidden", chat.streaming !== null);
  $("#chat-stop-button").classList.toggle("hidden", chat.streaming === null);
}

async function setFeedback(message, rating, comment) {
  try {
    const saved = await api(`/ui/api/messages/${message.id}/feedback`,
      { method: "POST", body: { rating, comment } });
    chat.messages.set(saved.id, saved);
    renderChat();
  } catch (e) { showError(e.message); }
}

// One chat turn: a new question (content), an edited one (content + parentId of the
// question it replaces), or a new answer to an existing question (regenerate).
async function sendChat({ content, parentId = null, regenerate = false }) {
  if (chat.streaming) return;
  const body = {
    conversation_id: chat.conversation?.id ?? null,
    parent_id: parentId, model: $("#chat-model").value,
    system: $("#chat-system").value, params: chatParams(),
  };
  if (!regenerate) body.content = content;
  chat.streaming = { text: "" };
  chat.controller = new AbortController();
  if (regenerate) chat.leaf = parentId;  // show the question while its new answer streams
  renderChat();
  let saved = false;  // the server stored the question (a rejected turn stores nothing)
  try {
    for await (const ev of stream("/ui/api/chat", body, chat.controller.signal)) {
      if (ev.type === "conversation") {
        chat.conversation = ev.conversation;
      } else if (ev.type === "user") {
        saved = true;
        chat.messages.set(ev.message.id, ev.message);
        chat.leaf = ev.message.id;
        renderChat();
      } else if (ev.type === "delta") {
        chat.streaming.text += ev.text;
        const live = $("#messages .streaming .content");
        if (live) live.textContent = chat.streaming.text;
        $("#messages").scrollTop = $("#messages").scrollHeight;
      } else if (ev.type === "done") {
        chat.messages.set(ev.message.id, ev.message);
        chat.leaf = ev.message.id;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
    if (!saved && content && !$("#chat-input").value) $("#chat-input").value = content;
  } finally {
    const controller = chat.controller;
    const stopped = controller?.signal.aborted;
    chat.streaming = null;
    if (chat.controller === controller) chat.controller = null;
    if (stopped) await new Promise((r) => setTimeout(r, 300));  // the server saves the partial answer
    try {
      if (chat.conversation) await openConversation(chat.conversation.id);
      else renderChat();
      await loadConversations();
    } catch (e) { showError(e.message); }
  }
}

// ---------------------------------------------------------------- playground

const pg = {
  controller: null, tokens: [], offsets: [], pinned: null, pendingBytes: [], pendingInfo: [],
};

function probColor(p) {
  return `hsl(${Math.round(120 * p)}, 75%, 82%)`;
}

// "bytes:\xe3\x81" -> [0xe3, 0x81]; other strings -> their UTF-8 bytes.
function tokenBytes(token) {
  if (token.startsWith("bytes:")) {
    return [...token.slice(6).matchAll(/\\x([0-9a-f]{2})/g)].map((m) => parseInt(m[1], 16));
  }
  return [...new TextEncoder().encode(token)];
}

// Whether `bytes` ends inside a UTF-8 character: a lead byte still missing continuation bytes.
function endsInsideCharacter(bytes) {
  for (let k = 1; k <= Math.min(4, bytes.length); k++) {
    const b = bytes[bytes.length - k];
    if ((b & 0xc0) === 0x80) continue;  // a continuation byte: the lead is further back
    const length = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    return length > k;
  }
  return false;
}

// Add one token to the output. A token that ends inside a UTF-8 character is held back and
// shown together with the token that completes it (both sets of alternatives on hover).
// `offset`: where the token starts in the choice's text (the API's text_offset).
function addToken(token, logprob, top, isPrompt, offset) {
  if (!pg.pendingInfo.length) pg.pendingOffset = offset;
  pg.pendingBytes.push(...tokenBytes(token));
  pg.pendingInfo.push({ token, logprob, top });
  if (!endsInsideCharacter(pg.pendingBytes)) flushTokens(isPrompt);
}

// Show the held-back tokens (at the end of a stream, even an incomplete character: U+FFFD).
function flushTokens(isPrompt) {
  if (!pg.pendingInfo.length) return;
  const text = new TextDecoder().decode(new Uint8Array(pg.pendingBytes));
  const infos = pg.pendingInfo;
  pg.pendingBytes = [];
  pg.pendingInfo = [];
  const index = pg.tokens.length;
  pg.tokens.push(infos);
  pg.offsets.push(pg.pendingOffset);
  const scored = infos.filter((i) => i.logprob !== null && i.logprob !== undefined);
  const span = el("span", { class: "tok", "data-index": index, "data-prompt": isPrompt ? "1" : null }, text);
  if (scored.length) {
    const p = Math.exp(Math.min(...scored.map((i) => i.logprob)));
    span.style.background = probColor(p);
    span.dataset.prob = p.toFixed(4);
  } else {
    span.classList.add("prompt-plain");
  }
  $("#pg-output").append(span);
}

// A token as text you can see: quoted, with newlines and tabs escaped; partial characters
// keep the server's "bytes:\\xe3" form.
function showToken(tok) {
  return tok.startsWith("bytes:") ? tok : JSON.stringify(tok);
}

function alternativesTable(index) {
  const table = el("table", { class: "alts" });
  for (const info of pg.tokens[index]) {
    if (info.logprob === null || info.logprob === undefined) continue;
    const rows = Object.entries(info.top || {});
    if (!rows.some(([tok]) => tok === info.token)) rows.push([info.token, info.logprob]);
    rows.sort((a, b) => b[1] - a[1]);
    table.append(el("tr", {}, label("th", "pg.token"), label("th", "pg.prob"), el("th", {})));
    for (const [tok, lp] of rows) {
      const p = Math.exp(lp);
      table.append(el("tr", { class: tok === info.token ? "chosen" : "" },
        el("td", {}, showToken(tok)),
        el("td", {}, `${(100 * p).toFixed(2)}%`),
        el("td", {}, el("div", { class: "bar", style: `width:${Math.max(1, Math.round(120 * p))}px` }))));
    }
  }
  return table;
}

function showDetails(index) {
  const details = $("#pg-details");
  details.replaceChildren(alternativesTable(index));
  details.classList.remove("hidden");
}

async function runPlayground() {
  if (pg.controller) return;
  let bias = {};
  const biasText = $("#pg-logit-bias").value.trim();
  if (biasText) {
    try {
      bias = JSON.parse(biasText);
      if (typeof bias !== "object" || Array.isArray(bias)) throw new Error();
    } catch { showError(t("pg.bad_bias")); return; }
  }
  const echo = $("#pg-echo").checked;
  const body = {
    model: $("#pg-model").value, prompt: $("#pg-prompt").value, stream: true,
    temperature: numberOr("#pg-temperature", 1), top_p: numberOr("#pg-top-p", 1),
    top_k: numberOr("#pg-top-k", 0), min_p: numberOr("#pg-min-p", 0),
    max_tokens: numberOr("#pg-max-tokens", 48),
    presence_penalty: numberOr("#pg-presence", 0), frequency_penalty: numberOr("#pg-frequency", 0),
    repetition_penalty: numberOr("#pg-repetition", 1), logprobs: numberOr("#pg-logprobs", 5),
    stop: lines("#pg-stops"), logit_bias: bias, echo,
    stream_options: { include_usage: true },
  };
  const seed = numberOr("#pg-seed", null);
  if (seed !== null) body.seed = seed;

  const out = $("#pg-output");
  out.replaceChildren();
  if (!echo) out.append(el("span", { class: "tok prompt-plain" }, body.prompt));
  pg.tokens = []; pg.offsets = []; pg.pendingBytes = []; pg.pendingInfo = []; pg.pinned = null;
  $("#pg-details").classList.add("hidden");
  pg.controller = new AbortController();
  $("#pg-run").classList.add("hidden");
  $("#pg-stop").classList.remove("hidden");
  delete $("#pg-status").dataset.i18n;
  $("#pg-status").textContent = "…";
  let finish = null;
  let usage = null;
  let promptPart = echo;  // with echo, the first chunk is the scored prompt
  let released = 0;  // characters of text the API sent (a matched stop string is not text)
  try {
    for await (const chunk of stream("/v1/completions", body, pg.controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const lp = choice.logprobs;
        if (lp) {
          lp.tokens.forEach((tok, i) => addToken(
            tok, lp.token_logprobs[i], lp.top_logprobs[i], promptPart, lp.text_offset[i]));
        }
        if (promptPart) flushTokens(true);
        released += [...choice.text].length;  // code points, as the server counts them
        promptPart = false;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    flushTokens(false);
    // Tokens that start past the released text carried the stop string: shown struck through.
    $("#pg-output").querySelectorAll(".tok[data-index]").forEach((span) => {
      if (finish === "stop" && pg.offsets[Number(span.dataset.index)] >= released) {
        span.classList.add("stopped");
        span.dataset.i18nTitle = "pg.stopped";
        span.title = t("pg.stopped");
      }
    });
    pg.controller = null;
    $("#pg-run").classList.remove("hidden");
    $("#pg-stop").classList.add("hidden");
    setLabel($("#pg-status"), "pg.done", {
      n: usage ? usage.completion_tokens : "?", reason: finish || "—",
    });
  }
}

function setupPlaygroundHover() {
  const out = $("#pg-output");
  const tip = $("#tooltip");
  out.addEventListener("mouseover", (e) => {
    const span = e.target.closest(".tok[data-index]");
    if (!span || span.classList.contains("prompt-plain")) return;
    tip.replaceChildren(alternativesTable(Number(span.dataset.index)));
    const r = span.getBoundingClientRect();
    tip.style.left = `${Math.min(r.left, window.innerWidth - 320)}px`;
    tip.style.top = `${r.bottom + 6}px`;
    tip.classList.remove("hidden");
  });
  out.addEventListener("mouseout", (e) => {
    if (e.target.closest(".tok")) tip.classList.add("hidden");
  });
  out.addEventListener("click", (e) => {
    const span = e.target.closest(".tok[data-index]");
    if (!span || span.classList.contains("prompt-plain")) return;
    out.querySelectorAll(".tok.pinned").forEach((s) => s.classList.remove("pinned"));
    span.classList.add("pinned");
    showDetails(Number(span.dataset.index));
  });
}

// ---------------------------------------------------------------- arena

const arena = { battle: null, streaming: false, result: null };

function renderArenaResult() {
  const r = arena.result;
  $("#arena-result").textContent = r ? t("arena.thanks", { a: r.model_a, b: r.model_b }) : "";
}

function setVoting(enabled) {
  document.querySelectorAll(".vote").forEach((b) => { b.disabled = !enabled; });
}

async function runBattle() {
  const prompt = $("#arena-prompt").value.trim();
  if (!prompt || arena.streaming) return;
  if (models.length < 2) { showError(t("arena.need_two")); return; }
  arena.battle = null;
  arena.streaming = true;
  setVoting(false);
  $("#arena-send").disabled = true;
  for (const side of ["a", "b"]) {
    $(`#text-${side}`).textContent = "";
    $(`#name-${side}`).textContent = "";
    $(`#side-${side}`).classList.remove("winner");
  }
  arena.result = null;
  renderArenaResult();
  try {
    const body = { prompt, params: { ...chatParams(), seed: undefined } };
    for await (const ev of stream("/ui/api/arena/battles", body)) {
      if (ev.type === "delta") $(`#text-${ev.side}`).textContent += ev.text;
      else if (ev.type === "battle") arena.battle = ev.id;
    }
    setVoting(arena.battle !== null);
  } catch (e) {
    showError(e.message);
  } finally {
    arena.streaming = false;
    $("#arena-send").disabled = false;
  }
}

async function vote(winner) {
  if (!arena.battle) return;
  setVoting(false);
  try {
    const result = await api(`/ui/api/arena/battles/${arena.battle}/vote`, { method: "POST", body: { winner } });
    $("#name-a").textContent = `(${result.model_a})`;
    $("#name-b").textContent = `(${result.model_b})`;
    if (winner === "a" || winner === "b") $(`#side-${winner}`).classList.add("winner");
    arena.result = result;
    renderArenaResult();
    arena.battle = null;
    await loadLeaderboard();
  } catch (e) {
    showError(e.message);
    if (arena.battle && e.status !== 409) setVoting(true);  // 409: already voted
  }
}

async function loadLeaderboard() {
  let board;
  try { board = await api("/ui/api/arena/leaderboard"); } catch { return; }
  $("#vote-count").textContent = t(board.votes === 1 ? "arena.votes_one" : "arena.votes", { n: board.votes });
  $("#leaderboard tbody").replaceChildren(...board.models.map((m, i) => el("tr", { "data-model": m.model },
    el("td", {}, String(i + 1)), el("td", {}, m.model),
    el("td", { class: "num rating" }, m.rating.toFixed(0)),
    el("td", { class: "num" }, `${m.ci_low.toFixed(0)} – ${m.ci_high.toFixed(0)}`),
    el("td", { class: "num elo" }, m.elo.toFixed(0)),
    el("td", { class: "num battles" }, String(m.battles)),
    el("td", { class: "num" }, `${m.wins} / ${m.losses} / ${m.ties}`))));
}

// ---------------------------------------------------------------- inside

function insideBody() {
  return { model: $("#inside-model").value || undefined, text: $("#inside-text").value };
}

async function runLens() {
  const { model, text } = insideBody();
  const answer = $("#inside-answer").value;
  try {
    const r = await api("/v1/inside/lens", { method: "POST", body: { model, prompt: text, answer: answer.trim() ? answer : null } });
    const follow = r.answer_token !== null;
    const head = el("tr", {}, label("th", "inside.layer"), label("th", "inside.top"),
      follow ? el("th", {}, `p(${JSON.stringify(r.answer_token)})`) : null, follow ? label("th", "inside.rank") : null);
    const rows = r.layers.map((row) => el("tr", { class: "lens-row" },
      el("td", { class: "num" }, String(row.layer)),
      el("td", {}, ...row.top.map((c) => el("span", { class: "lens-token", style: `background:${probColor(c.prob)}` },
        `${JSON.stringify(c.token)} ${(100 * c.prob).toFixed(1)}%`))),
      follow ? el("td", { class: "num" }, `${(100 * row.answer_prob).toFixed(2)}%`) : null,
      follow ? el("td", { class: "num" }, String(row.answer_rank)) : null));
    $("#inside-output").replaceChildren(label("p", "inside.lens_hint", null, { class: "hint" }),
      el("table", { class: "lens", id: "lens-table" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  } catch (e) { showError(e.message); }
}

async function runAttention() {
  const layerSelect = $("#inside-layer");
  const layer = layerSelect.value === "" ? null : Number(layerSelect.value);
  try {
    const r = await api("/v1/inside/attention", { method: "POST", body: { ...insideBody(), layer } });
    if (layerSelect.options.length !== r.n_layer) {
      layerSelect.replaceChildren(...Array.from({ length: r.n_layer }, (_, i) => el("option", { value: String(i) }, String(i))));
    }
    layerSelect.value = String(r.layer);
    const heads = r.attention.map((map, h) => {
      const header = el("tr", {}, el("th", {}), ...r.tokens.map((tok) => el("th", { class: "key" }, tok)));
      const rows = map.map((weights, q) => el("tr", {}, el("th", { class: "query" }, r.tokens[q]),
        ...weights.map((w, k) => el("td", {
          class: "cell", title: `${r.tokens[q]} → ${r.tokens[k]}: ${w.toFixed(3)}`,
          style: `background:rgba(37,99,235,${w.toFixed(3)})`,
        }))));
      return el("div", { class: "head-map" }, label("div", "inside.head", { h }, { class: "side-title" }),
        el("table", { class: "attention", "data-head": String(h) }, header, ...rows));
    });
    $("#inside-output").replaceChildren(label("p", "inside.attention_hint", null, { class: "hint" }),
      el("div", { class: "head-maps", id: "attention-maps" }, ...heads));
  } catch (e) { showError(e.message); }
}

async function runNeighbours() {
  const model = $("#inside-model").value || undefined;
  try {
    const r = await api("/v1/inside/neighbours", { method: "POST", body: { model, word: $("#inside-word").value, k: 10 } });
    const rows = r.neighbours.map((n) => el("tr", { class: "neighbour" },
      el("td", {}, JSON.stringify(n.token)), el("td", { class: "num" }, n.cosine.toFixed(3))));
    $("#inside-output").replaceChildren(label("p", "inside.neighbours_hint", null, { class: "hint" }),
      el("p", {}, `${JSON.stringify(r.word)} = ${r.tokens.map((x) => JSON.stringify(x)).join(" + ")}`),
      el("table", { class: "lens", id: "neighbours-table" },
        el("thead", {}, el("tr", {}, label("th", "inside.word"), label("th", "inside.cosine"))),
        el("tbody", {}, ...rows)));
  } catch (e) { showError(e.message); }
}

// ---------------------------------------------------------------- start

function setup() {
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("#lang").addEventListener("change", (e) => {
    lang = e.target.value;
    localStorage.setItem("kotonoha.lang", lang);
    applyLanguage();
  });
  $("#key-button").addEventListener("click", askForKey);
  $("#key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    apiKey = $("#key-input").value.trim();
    localStorage.setItem("kotonoha.apiKey", apiKey);
    $("#key-dialog").classList.add("hidden");
    await start();
  });

  $("#new-chat").addEventListener("click", newConversation);
  $("#chat-settings-toggle").addEventListener("click", () => $("#chat-settings").classList.toggle("hidden"));
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#chat-input").value;
    if (!text.trim() || chat.streaming) return;
    $("#chat-input").value = "";
    sendChat({ content: text, parentId: chat.leaf });
  });
  $("#chat-input").addEventListener("keydown", (e) => {
    // isComposing: Japanese IME; keyCode 229: Safari's Enter that confirms a conversion.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  $("#chat-stop-button").addEventListener("click", () => chat.controller?.abort());

  $("#pg-run").addEventListener("click", runPlayground);
  $("#pg-stop").addEventListener("click", () => pg.controller?.abort());
  setupPlaygroundHover();

  $("#arena-form").addEventListener("submit", (e) => { e.preventDefault(); runBattle(); });

  $("#inside-lens").addEventListener("click", runLens);
  $("#inside-attention").addEventListener("click", runAttention);
  $("#inside-neighbours").addEventListener("click", runNeighbours);
  $("#inside-layer").addEventListener("change", runAttention);
  $("#inside-model").addEventListener("change", () => $("#inside-layer").replaceChildren());
  document.querySelectorAll(".vote").forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
}

async function start() {
  try {
    const health = await (await fetch("/health")).json();
    $("#key-button").classList.toggle("hidden", !health.auth);
    if (health.auth && !apiKey) { askForKey(); return; }
    await loadModels();
    await loadConversations();
    applyLanguage();
    document.body.dataset.ready = "1";  // for tests: the page has loaded its data
  } catch (e) {
    showError(e.message);
  }
}

setup();
applyLanguage();
showTab(localStorage.getItem("kotonoha.tab") || "chat");
start();
