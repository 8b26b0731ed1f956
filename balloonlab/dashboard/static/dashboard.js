// balloonlab dashboard: vanilla JS + SVG, no library, no network but this page's own server.
// State comes from the server's event stream ("stream"): a snapshot, then frames, events, meta as they change.
// Every field is read where present, so counters that later engines log show up in the tables unchanged.
"use strict";

const MIB_PAGES = 256;   // 4 KiB pages in a MiB
const KINDS = [  // a guest's memory as it sees it, left to right; the balloon sits at the right end
  ["kernel_pages", "kernel", "var(--kernel)"], ["anon_pages", "anonymous", "var(--anon)"],
  ["file_pages", "file cache", "var(--file)"], ["free", "free", "var(--free)"],
  ["balloon_pages", "balloon", "var(--balloon)"]];
const HOST_OWNERS = [["cache_pages", "disk cache", "var(--cache)"], ["iobuf_pages", "I/O buffers", "var(--iobuf)"],
  ["busy_frames", "busy", "var(--busy)"], ["free_frames", "free", "var(--hostfree)"]];
const MAX_EVENTS_SHOWN = 250;

const S = {
  variants: {}, order: [], chosen: null, summary: null, live: false, ended: false, connected: false,
  pos: null,            // frame index shown; null: the latest (following)
  playing: false, timer: null, dirty: false, runDir: "",
  hash: {},             // #variant=NAME&frame=N: open the page at that moment
  hidden: new Set(),    // event kinds left out of the list
};

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const svg = ["svg", "rect", "line", "path", "polygon", "polyline", "text", "g", "defs", "pattern", "circle",
    "marker", "title", "tspan"].includes(tag);
  const n = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "text") n.textContent = v; else n.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) n.append(k);
  return n;
};
const num = (x) => typeof x === "number" && isFinite(x);
function fmt(x, digits = 0) {
  if (!num(x)) return "–";
  const a = Math.abs(x);
  if (a >= 1e9) return (x / 1e9).toFixed(2) + " G";
  if (a >= 1e6) return (x / 1e6).toFixed(2) + " M";
  if (a >= 1e4) return (x / 1e3).toFixed(1) + " k";
  return x.toFixed(digits);
}
const mib = (pages) => num(pages) ? (pages / MIB_PAGES).toFixed(1) + " MiB" : "–";
const guestColor = (i) => `hsl(${(i * 137.508) % 360}, 52%, 56%)`;
const sortedIds = (obj) => Object.keys(obj || {}).sort((a, b) => (+a) - (+b));

// --- the stream -----------------------------------------------------------------------------

function variant(name) {
  if (!S.variants[name]) {
    S.variants[name] = {name, meta: {variant: name}, frames: [], events: [], counts: {}, finished: null, left: {}};
    S.order.push(name);
  }
  return S.variants[name];
}

function handle(msg) {
  switch (msg.type) {
    case "snapshot": {
      const st = msg.state;
      S.variants = {}; S.order = [];
      for (const v of st.variants) Object.assign(variant(v.name), v);
      S.summary = st.summary; S.live = st.live; S.ended = st.ended; S.runDir = st.run_dir || "";
      if (!S.live && S.pos === null) S.pos = 0;   // a replay starts at the beginning, paused
      if (S.hash.variant && S.variants[S.hash.variant]) S.chosen = S.hash.variant;
      if (num(S.hash.frame)) { S.pos = S.hash.frame; $("follow").checked = false; }
      S.hash = {};
      break;
    }
    case "variant": variant(msg.variant); break;
    case "meta": Object.assign(variant(msg.variant).meta, msg.meta); break;
    case "frame": variant(msg.variant).frames[msg.index] = msg.frame; break;
    case "event": {
      const v = variant(msg.variant);
      v.events[msg.index] = msg.event;   // the counts per kind come with "counts"
      break;
    }
    case "counts": Object.assign(variant(msg.variant).counts, msg.counts); break;
    case "finished": variant(msg.variant).finished = msg.finished; break;
    case "summary": S.summary = msg.summary; break;
    case "end": S.ended = true; S.live = false; if (S.es) S.es.close(); break;
  }
  S.dirty = true;
}

function connect() {
  const es = new EventSource("stream");
  S.es = es;
  es.onopen = () => { S.connected = true; S.dirty = true; };
  es.onmessage = (m) => handle(JSON.parse(m.data));
  es.onerror = () => { S.connected = false; S.dirty = true; if (S.ended) es.close(); };
}

// --- which frame -----------------------------------------------------------------------------

function currentVariant() {
  if (S.chosen && S.variants[S.chosen]) return S.variants[S.chosen];
  if (!S.live && S.order.length) return S.variants[S.order[0]];   // a replay starts with the first variant
  // following: the last variant that has frames (a multi-variant run moves on by itself)
  for (let i = S.order.length - 1; i >= 0; i--) if (S.variants[S.order[i]].frames.length) return S.variants[S.order[i]];
  return S.variants[S.order[0]] || null;
}

function frameIndex(v) {
  const n = v.frames.length;
  if (!n) return -1;
  if (S.pos === null || $("follow").checked && S.live) return n - 1;
  return Math.max(0, Math.min(n - 1, S.pos));
}

// --- rendering ------------------------------------------------------------------------------

function render() {
  S.dirty = false;
  const v = currentVariant();
  if (S.live) S.liveOnce = true;
  const status = S.live && S.connected ? "live" : S.ended && S.liveOnce ? "finished"
    : S.connected || S.ended ? "replay" : S.liveOnce ? "disconnected" : "connecting";
  document.body.dataset.status = status;
  $("status").textContent = {live: "● LIVE", replay: "REPLAY", finished: "RUN OVER", disconnected: "DISCONNECTED",
    connecting: "connecting…"}[status];
  $("follow-label").hidden = !S.live;
  $("source").textContent = S.runDir;
  renderTabs(v);
  if (!v) return;
  const i = frameIndex(v);
  const f = i >= 0 ? v.frames[i] : null;
  document.body.dataset.variant = v.name;
  document.body.dataset.frames = String(v.frames.length);
  document.body.dataset.frame = String(i);
  document.body.dataset.tick = f ? String(f.tick) : "";
  renderHeader(v, f);
  renderSlider(v, i);
  if (f) {
    renderHost(v, f);
    renderCharts(v, i);
    renderGuests(v, f);
  } else {   // a variant that ended before its first metrics tick (a deadlock at tick 5, metrics every 10)
    const why = v.finished ? `it ended after ${v.finished.ticks ?? "?"} ticks (${v.finished.reason}), before its first metrics tick` +
      (v.meta.metrics_every_ticks ? ` (every ${v.meta.metrics_every_ticks} ticks)` : "") : "waiting for the first metrics tick";
    $("host-bar").replaceChildren();
    $("host-legend").replaceChildren(el("span", {text: `No memory figures for ${v.name}: ${why}.`}));
    $("host-stats").replaceChildren();
    $("guests").tBodies[0].replaceChildren();
  }
  renderEvents(v, f);
  renderSummary();
}

function renderTabs(cur) {
  const nav = $("variants");
  const want = S.order.join("\u0000") + "|" + (cur ? cur.name : "") + "|" +
    S.order.map((n) => statusOf(S.variants[n])).join(",");
  if (nav.dataset.key === want) return;
  nav.dataset.key = want;
  nav.replaceChildren(...S.order.map((n) => {
    const b = el("button", {type: "button", class: cur && cur.name === n ? "active" : "", "data-variant": n},
      n, el("span", {class: "st", text: statusOf(S.variants[n])}));
    b.onclick = () => { S.chosen = n; S.pos = S.live ? null : 0; stop(); S.dirty = true; };
    return b;
  }));
}

function statusOf(v) {
  if (v.finished) return v.finished.reason === "completed" ? "done" : v.finished.reason;
  return v.frames.length ? "running" : "waiting";
}

function overcommit(v, f) {
  const hostPages = (f && f.host.total_frames) || v.meta.host_ram_pages;
  const guestPages = v.meta.guest_ram_pages_total;
  return num(hostPages) && num(guestPages) && hostPages > 0 ? guestPages / hostPages : null;
}

function renderHeader(v, f) {
  const m = v.meta;
  $("scenario").textContent = m.scenario || "…";
  $("seed").textContent = m.seed ?? "–";
  $("policy").textContent = m.balloon_policy || "none";
  $("locks-info").hidden = !m.lock_protocol;
  $("locks").textContent = m.lock_protocol || "";
  const oc = overcommit(v, f);
  $("overcommit").textContent = oc === null ? "–" : oc.toFixed(2) + "×";
  const hostPages = (f && f.host.total_frames) || m.host_ram_pages;
  $("host-ram").textContent = num(hostPages) ? `${mib(hostPages)} (${fmt(hostPages)} frames)` : "–";
  $("tick").textContent = f ? `${f.tick + 1}${m.ticks ? " / " + m.ticks : ""}` : "–";
  $("vt").textContent = f ? f.vt_s.toFixed(3) + " s" : "–";
  $("wall").textContent = f && num(f.wall_s) ? f.wall_s.toFixed(1) + " s" : "–";
}

function renderSlider(v, i) {
  const s = $("slider");
  s.max = String(Math.max(0, v.frames.length - 1));
  if (document.activeElement !== s) s.value = String(Math.max(0, i));
  const f = v.frames[i];
  $("slider-label").textContent = f ? `frame ${i + 1}/${v.frames.length} · tick ${f.tick + 1} · ${f.vt_s.toFixed(3)} s` : "no tick logged yet";
  $("play").textContent = S.playing ? "❚❚ pause" : "▶ play";
}

// host: one bar of its RAM by owner, tiles, every counter
function renderHost(v, f) {
  const h = f.host;
  const total = h.total_frames || 1;
  const svg = $("host-bar");
  const segs = [];
  const ids = sortedIds(f.guests);
  ids.forEach((id, k) => {
    const hv = f.guests[id].host;
    if (hv && num(hv.resident_pages)) segs.push([`guest ${id}`, hv.resident_pages, guestColor(k), "guest", id]);
  });
  for (const [key, label, color] of HOST_OWNERS) if (num(h[key])) segs.push([label, h[key], color, key, null]);
  let x = 0;
  const kids = [];
  for (const [label, pages, color, kind, id] of segs) {
    const w = pages / total * 1000;
    kids.push(el("rect", {x: x.toFixed(2), y: 2, width: Math.max(0, w).toFixed(2), height: 30, fill: color,
      stroke: "#fff", "stroke-width": 0.6, "data-kind": kind, "data-guest": id, "data-pages": pages},
      el("title", {text: `${label}: ${fmt(pages)} frames (${mib(pages)})`})));
    x += w;
  }
  svg.replaceChildren(...kids);
  const legend = segs.length > 14 ? [["guests (one shade each)", guestColor(0)], ...HOST_OWNERS.map((o) => [o[1], o[2]])]
    : segs.filter((s) => s[1] > 0 || s[3] === "free_frames").map((s) => [`${s[0]} ${mib(s[1])}`, s[2]]);
  $("host-legend").replaceChildren(...legend.map(([l, c]) => el("span", {}, el("i", {style: `background:${c}`}), l)));

  const tiles = [
    ["free frames", fmt(h.free_frames), mib(h.free_frames), "free_frames"],
    ...(h.memory_state !== undefined ? [["memory state", String(h.memory_state), "", "memory_state"]] : []),
    ["I/O buffers", fmt(h.iobuf_pages), mib(h.iobuf_pages), "iobuf_pages"],
    ["disk cache", fmt(h.cache_pages), mib(h.cache_pages), "cache_pages"],
    ["pinned", fmt(h.pinned_frames), mib(h.pinned_frames), "pinned_frames"],
    ["host swap in use", fmt(h.swap_used_slots), num(h.swap_slots) ? `of ${mib(h.swap_slots)}` : "", "swap_used_slots"],
    ["host swap-out /s", fmt(h.swap_out_per_vsec), "pages per virtual s", "swap_out_per_vsec"],
    ["host swap-in /s", fmt(h.swap_in_per_vsec), "pages per virtual s", "swap_in_per_vsec"],
    ["overcommit", overcommit(v, f) === null ? "–" : overcommit(v, f).toFixed(2) + "×", "guest RAM / host RAM", "overcommit"],
    ["EPT faults /s", fmt(h.ept_faults_per_vsec), "pages", "ept_faults_per_vsec"],
    ["double faults", fmt(h.double_faults), "so far", "double_faults"],
  ];
  $("host-stats").replaceChildren(...tiles.map(([k, val, u, key]) => el("div",
    {class: "tile" + (key === "memory_state" ? " state-" + String(h.memory_state).toLowerCase() : ""), "data-key": key},
    el("div", {class: "k", text: k}), el("div", {class: "v", text: val}), el("div", {class: "u", text: u}))));
  const rows = Object.entries(h).filter(([, x]) => num(x) || typeof x === "string").sort((a, b) => a[0] < b[0] ? -1 : 1);
  $("host-all").replaceChildren(...rows.map(([k, x]) => el("tr", {}, el("td", {text: k}),
    el("td", {text: num(x) ? (Number.isInteger(x) ? x.toLocaleString("en") : x.toFixed(2)) : x}))));
}

// charts over the frames so far, a cursor at the one shown
function renderCharts(v, i) {
  const frames = v.frames.filter(Boolean);
  if (!frames.length) return;
  const W = 480, H = 150, L = 44, R = 6, T = 6, B = 18;
  const tMax = Math.max(frames[frames.length - 1].vt_s, 1e-9);
  const X = (t) => L + (t / tMax) * (W - L - R);
  const cursor = v.frames[i] ? X(v.frames[i].vt_s) : null;
  const axes = (yMax, unit) => [
    el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}),
    el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}),
    el("text", {x: L - 3, y: T + 8, "text-anchor": "end", text: fmt(yMax)}),
    el("text", {x: L - 3, y: H - B, "text-anchor": "end", text: "0"}),
    el("text", {x: L, y: H - 4, text: "0 s"}),
    el("text", {x: W - R, y: H - 4, "text-anchor": "end", text: tMax.toFixed(2) + " s"}),
    el("text", {x: (L + W) / 2, y: H - 4, "text-anchor": "middle", text: unit})];
  // host frames by owner: stacked areas (guests together, cache, I/O buffers, free)
  {
    const total = Math.max(...frames.map((f) => f.host.total_frames || 0), 1);
    const Y = (p) => H - B - (p / total) * (H - B - T);
    const layers = [["guests", (f) => sumGuests(f, "resident_pages"), "#7f8ea3"],
      ["disk cache", (f) => f.host.cache_pages || 0, "var(--cache)"],
      ["I/O buffers", (f) => f.host.iobuf_pages || 0, "var(--iobuf)"],
      ["free", (f) => f.host.free_frames || 0, "var(--hostfree)"]];
    const base = frames.map(() => 0);
    const kids = axes(total, "frames");
    for (const [name, get, color] of layers) {
      const top = frames.map((f, k) => base[k] + get(f));
      const pts = frames.map((f, k) => `${X(f.vt_s).toFixed(1)},${Y(top[k]).toFixed(1)}`)
        .concat(frames.map((f, k) => `${X(f.vt_s).toFixed(1)},${Y(base[k]).toFixed(1)}`).reverse());
      kids.push(el("polygon", {points: pts.join(" "), fill: color, opacity: 0.85}, el("title", {text: name})));
      top.forEach((t, k) => { base[k] = t; });
    }
    if (cursor !== null) kids.push(el("line", {x1: cursor, x2: cursor, y1: T, y2: H - B, stroke: "#000", "stroke-width": 1.5}));
    $("chart-host").replaceChildren(...kids);
  }
  {
    const thr = frames.map((f) => sumRates(f, "refs_per_vsec"));
    const sout = frames.map((f) => f.host.swap_out_per_vsec);
    const sin = frames.map((f) => f.host.swap_in_per_vsec);
    const yMax = Math.max(1, ...thr.filter(num), ...sout.filter(num), ...sin.filter(num));
    const Y = (p) => H - B - (p / yMax) * (H - B - T);
    const kids = axes(yMax, "per virtual s");
    for (const [vals, color, name] of [[thr, "#2e9d4b", "references (all guests)"], [sout, "#d62728", "host swap-out pages"],
      [sin, "#1f77b4", "host swap-in pages"]]) {
      const pts = frames.map((f, k) => num(vals[k]) ? `${X(f.vt_s).toFixed(1)},${Y(vals[k]).toFixed(1)}` : null).filter(Boolean);
      kids.push(el("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.6}, el("title", {text: name})));
    }
    kids.push(el("text", {x: L + 4, y: T + 10, fill: "#2e9d4b", text: "references"}));
    kids.push(el("text", {x: L + 74, y: T + 10, fill: "#d62728", text: "swap-out"}));
    kids.push(el("text", {x: L + 128, y: T + 10, fill: "#1f77b4", text: "swap-in"}));
    if (cursor !== null) kids.push(el("line", {x1: cursor, x2: cursor, y1: T, y2: H - B, stroke: "#000", "stroke-width": 1.5}));
    $("chart-rates").replaceChildren(...kids);
  }
}

function sumGuests(f, key) {
  let s = 0;
  for (const g of Object.values(f.guests)) if (g.host && num(g.host[key])) s += g.host[key];
  return s;
}

function sumRates(f, key) {
  let s = 0, any = false;
  for (const g of Object.values(f.guests)) if (num(g.rates[key])) { s += g.rates[key]; any = true; }
  return any ? s : null;
}

// guests: one row each, a stacked bar of its memory with what the host swapped hatched and the target marked
function renderGuests(v, f) {
  const ids = sortedIds(f.guests);
  const sizes = ids.map((id) => guestTotal(v, f.guests[id], id)).filter(num);
  const scale = Math.max(1, ...sizes);
  const lg = $("guest-legend");
  if (!lg.childElementCount) {
    lg.replaceChildren(...KINDS.map(([, l, c]) => el("span", {}, el("i", {style: `background:${c}`}), l)),
      el("span", {}, el("i", {style: "background: repeating-linear-gradient(45deg,#000 0 2px,#fff 2px 4px)"}), "host-swapped"),
      el("span", {}, el("i", {style: "background:#000;width:3px"}), "balloon target"));
  }
  const tbody = $("guests").tBodies[0];
  const rows = ids.map((id) => guestRow(v, f, id, scale));
  tbody.replaceChildren(...rows);
}

function guestTotal(v, g, id) {
  if (g.guest && num(g.guest.total)) return g.guest.total;
  if (g.host && num(g.host.guest_pages)) return g.host.guest_pages;
  return (v.meta.guest_ram_pages || {})[id];
}

function guestRow(v, f, id, scale) {
  const g = f.guests[id];
  const gs = g.guest || {};
  const hv = g.host || {};
  const total = guestTotal(v, g, id) || 0;
  const target = num(g.balloon_target_pages) ? g.balloon_target_pages : gs.balloon_target_pages;
  const balloon = num(gs.balloon_pages) ? gs.balloon_pages : hv.ballooned_pages;
  const swapped = hv.swapped_pages;
  const W = 1000, H = 22;
  const k = W / scale;
  const kids = [el("defs", {}, el("pattern", {id: `hatch-${id}`, width: 5, height: 5, patternUnits: "userSpaceOnUse",
    patternTransform: "rotate(45)"}, el("rect", {width: 2, height: 5, fill: "#000", opacity: 0.75})))];
  let x = 0;
  const pos = {};
  if (g.guest) {
    for (const [key, label, color] of KINDS) {
      const p = num(gs[key]) ? gs[key] : 0;
      pos[key] = [x, p * k];
      kids.push(el("rect", {x: x.toFixed(2), y: 2, width: (p * k).toFixed(2), height: H - 4, fill: color, "data-kind": key,
        "data-pages": p}, el("title", {text: `${label}: ${fmt(p)} pages (${mib(p)})`})));
      x += p * k;
    }
  } else if (num(hv.resident_pages)) {   // the guest has not logged yet: what the host sees
    for (const [key, p, color] of [["resident_pages", hv.resident_pages, "#7f8ea3"], ["ballooned_pages", hv.ballooned_pages || 0, "var(--balloon)"]]) {
      kids.push(el("rect", {x: x.toFixed(2), y: 2, width: (p * k).toFixed(2), height: H - 4, fill: color, "data-kind": key, "data-pages": p}));
      x += p * k;
    }
  }
  if (num(swapped) && swapped > 0 && g.guest) {
    // the host swapped these out of the guest's used memory (anonymous + file cache): hatch the end of it
    const usedEnd = (pos.file_pages ? pos.file_pages[0] + pos.file_pages[1] : x);
    const w = Math.min(swapped * k, usedEnd);
    kids.push(el("rect", {x: (usedEnd - w).toFixed(2), y: 2, width: w.toFixed(2), height: H - 4, fill: `url(#hatch-${id})`,
      "data-kind": "host_swapped", "data-pages": swapped}, el("title", {text: `host-swapped: ${fmt(swapped)} pages`})));
  }
  if (num(target) && total) {
    const tx = (total - target) * k;
    kids.push(el("polygon", {points: `${tx - 6},0 ${tx + 6},0 ${tx},7`, fill: "#000", "data-kind": "target"}),
      el("line", {x1: tx, x2: tx, y1: 0, y2: H, stroke: "#000", "stroke-width": 2.5, "data-kind": "target-line"},
        el("title", {text: `balloon target: ${fmt(target)} pages`})));
  }
  if (total) kids.push(el("rect", {x: 0, y: 2, width: (total * k).toFixed(2), height: H - 4, fill: "none", stroke: "#333", "stroke-width": 0.8}));
  const bar = el("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none"}, ...kids);
  const r = g.rates || {};
  const left = g.left || (v.left && v.left[id] && v.left[id].vt_s <= f.vt_s + 1e-9 ? v.left[id] : null);
  const idCell = el("td", {}, `guest ${id}`, el("br"), el("small", {class: "mono", text: mib(total)}));
  if (left) idCell.append(el("span", {class: "leftnote", text: `left at ${left.vt_s.toFixed(3)} s: ${left.reason}`}));
  const alloc = num(g.alloc_target_pages) ? g.alloc_target_pages : hv.alloc_target_pages;
  const tr = el("tr", {"data-guest": id, class: left ? "left" : "",
      "data-balloon-pages": balloon ?? "", "data-target-pages": target ?? "", "data-refs": gs.refs ?? "",
      "data-host-swapped": swapped ?? "", "data-major-faults": gs.major_faults ?? "", "data-lost-pages": gs.lost_pages ?? "",
      "data-tick": gs.tick ?? ""},
    idCell, el("td", {class: "barcol"}, bar),
    el("td", {}, `${fmt(balloon)} / ${fmt(target)}`, num(alloc) ? el("small", {class: "mono", text: ` alloc ${fmt(alloc)}`}) : null),
    el("td", {text: fmt(swapped)}),
    el("td", {text: fmt(r.faults_per_vsec)}),
    el("td", {text: fmt(gs.pff)}),
    el("td", {}, fmt(r.refs_per_vsec), el("small", {class: "mono", text: " refs/s"})),
    el("td", {text: `${fmt(r.host_swap_in_per_vsec)} · ${fmt(r.host_swap_out_per_vsec)}`}));
  return tr;
}

// events up to the frame shown (all of them when following), newest first; the last deadlock drawn
function renderEvents(v, f) {
  const upto = f ? f.vt_s + 1e-9 : Infinity;
  const following = S.live && (S.pos === null || $("follow").checked);
  const upToNow = v.events.filter((e) => e && (following || e.vt_s <= upto));
  const shown = upToNow.filter((e) => !S.hidden.has(e.name));
  const key = `${v.name}|${shown.length}|${v.events.length}|${shown.length ? shown[shown.length - 1].text : ""}`;
  const counts = Object.entries(v.counts).filter(([n]) => !["run_started", "guest_started", "guest_connected",
    "guest_finished", "run_finished", "audit_reported"].includes(n)).sort((a, b) => b[1] - a[1]);
  $("event-counts").title = S.live ? "every kind of event in the logs so far" : "every kind of event in the whole run";
  $("event-counts").replaceChildren(...counts.map(([n, c]) => {
    const chip = el("span", {"data-event": n, "data-count": c, class: S.hidden.has(n) ? "off" : "",
      title: "click to hide or show this kind in the list", text: `${n} ${c}`});
    chip.onclick = () => { S.hidden.has(n) ? S.hidden.delete(n) : S.hidden.add(n); $("events").dataset.key = ""; S.dirty = true; };
    return chip;
  }));
  $("events-note").textContent = following ? "as they happen (all processes)" : "up to the time shown";
  if ($("events").dataset.key === key) return;
  $("events").dataset.key = key;
  const items = shown.slice(-MAX_EVENTS_SHOWN).reverse().map(eventItem);
  $("events").replaceChildren(...items);
  // what a lecture points at stays on top: the last deadlock's wait-for graph, a swap storm while it lasts
  const last = (name) => [...upToNow].reverse().find((e) => e.name === name);
  const dl = last("deadlock_detected");
  const storm = last("swap_storm_detected");
  const ended = last("swap_storm_ended");
  const stormOn = storm && (!ended || ended.vt_s < storm.vt_s || (ended.data.storm ?? 0) < (storm.data.storm ?? 0));
  const top = [];
  if (dl && Array.isArray(dl.data.cycle)) {
    const n = upToNow.filter((e) => e.name === "deadlock_detected").length;
    top.push(el("div", {class: "hl-title", text: `deadlock at ${dl.vt_s.toFixed(4)} s${n > 1 ? ` (the last of ${n})` : ""}: ${dl.data.action || ""}`}),
      waitForGraph(dl.data.cycle, 560));
  }
  if (stormOn) top.push(el("div", {class: "hl-title storm", text: `swap storm ${storm.data.storm ?? ""} since ${storm.vt_s.toFixed(3)} s`}),
    chainList(storm.data.chain || []));
  $("deadlock").hidden = !top.length;
  $("deadlock").replaceChildren(...top);
}

function chainList(chain) {
  return el("ul", {class: "chain"}, ...chain.map((c) => el("li", {},
    el("span", {class: c.ok ? "ok" : "no", text: c.ok ? "✔ " : "✘ "}),
    `${c.link}: ${fmt(c.value, 1)} against a threshold of ${fmt(c.threshold, 1)}`)));
}

function eventItem(e) {
  const li = el("li", {class: `k-${e.name} lvl-${e.level}`, "data-event": e.name},
    el("span", {class: "when", text: `${e.approx ? "≈" : ""}${e.vt_s.toFixed(3)} s`}),
    el("span", {class: "name", text: e.name}), el("span", {class: "when", text: e.src}));
  if (e.name === "swap_storm_detected" && Array.isArray(e.data.chain)) {
    li.append(el("div", {text: "the chain of conditions (every link held):"}), chainList(e.data.chain));
  } else if (e.name === "deadlock_detected" && Array.isArray(e.data.cycle)) {
    li.append(el("div", {class: "text", text: e.data.summary || e.text}), waitForGraph(e.data.cycle, 460));
  } else {
    li.append(el("span", {class: "text", text: e.text}));
  }
  return li;
}

// a wait-for cycle: each task a node around a circle; an arrow from a waiting task to the task holding what it waits for
function waitForGraph(cycle, width) {
  const n = cycle.length;
  const W = width, H = n <= 2 ? 190 : 280, cx = W / 2, cy = H / 2, BW = 78, BH = 20;
  const r = n <= 2 ? W * 0.3 : Math.min(W, H) * 0.34;
  const pos = cycle.map((_, k) => n <= 2 ? [cx + (k === 0 ? -r : r), cy] :
    [cx + r * Math.cos(2 * Math.PI * k / n - Math.PI / 2), cy + r * Math.sin(2 * Math.PI * k / n - Math.PI / 2)]);
  // where a line from a box's centre towards (dx, dy) leaves the box
  const edge = ([x, y], dx, dy) => {
    const t = Math.min(Math.abs(dx) > 1e-9 ? BW / Math.abs(dx) : Infinity, Math.abs(dy) > 1e-9 ? BH / Math.abs(dy) : Infinity);
    return [x + dx * t, y + dy * t];
  };
  const kids = [el("defs", {}, el("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse"}, el("path", {d: "M 0 0 L 10 5 L 0 10 z", fill: "#b0413e"})))];
  cycle.forEach((w, k) => {
    const [x1, y1] = pos[k], [x2, y2] = pos[(k + 1) % n];
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    const nx = dy / len, ny = -dx / len;            // the side this arrow bends to (the other arrow bends the other way)
    const bend = n <= 2 ? 48 : 26;
    const [sx, sy] = edge(pos[k], dx + nx * bend * 1.6, dy + ny * bend * 1.6);
    const [ex, ey] = edge(pos[(k + 1) % n], -dx + nx * bend * 1.6, -dy + ny * bend * 1.6);
    const qx = (x1 + x2) / 2 + nx * bend * 2, qy = (y1 + y2) / 2 + ny * bend * 2;
    kids.push(el("path", {d: `M ${sx} ${sy} Q ${qx} ${qy} ${ex} ${ey}`, fill: "none", stroke: "#b0413e", "stroke-width": 2,
      "marker-end": "url(#arrow)"}));
    const ax = (sx + 2 * qx + ex) / 4, ay = (sy + 2 * qy + ey) / 4;   // the curve's apex
    kids.push(el("text", {x: ax + nx * 12, y: ay + ny * 12 + 4, "text-anchor": "middle", fill: "#b0413e",
      text: `waits for ${w.waits_for_lock || w.waits_for}${w.site ? " (" + w.site + ")" : ""}`}));
  });
  cycle.forEach((w, k) => {
    const [x, y] = pos[k];
    kids.push(el("rect", {x: x - BW, y: y - BH, width: 2 * BW, height: 2 * BH, rx: 6, fill: "#fff", stroke: "#1d2330", "stroke-width": 1.5}));
    kids.push(el("text", {x, y: y - 4, "text-anchor": "middle", "font-weight": 700, text: w.owner || `${w.proc}/${w.task}`}));
    kids.push(el("text", {x, y: y + 12, "text-anchor": "middle", fill: "#555", text: `holds ${w.holds_lock || w.holds}`}));
  });
  return el("svg", {class: "waitfor", viewBox: `0 0 ${W} ${H}`, "data-cycle-length": n}, ...kids);
}

function renderSummary() {
  const s = S.summary;
  $("summary-panel").hidden = !s;
  if (!s) return;
  const rows = [["scenario", s.scenario], ["seed", s.seed]];
  for (const [name, v] of Object.entries(s.variants || {})) {
    rows.push([`${name}: ticks · virtual s · ended`, `${v.ticks} · ${v.virtual_s} · ${v.reason}`]);
    rows.push([`${name}: throughput (refs / virtual s)`, fmt(v.refs_per_vsec)]);
    rows.push([`${name}: host swap-out pages`, fmt((v.host || {}).swap_out_pages)]);
    rows.push([`${name}: swap storms · deadlocks · lost pages`, `${v.swap_storms ?? 0} · ${v.deadlocks ?? 0} · ${v.lost_pages}`]);
  }
  $("summary").replaceChildren(...rows.map(([k, x]) => el("tr", {}, el("td", {text: k}), el("td", {text: String(x)}))));
}

// --- controls ----------------------------------------------------------------------------------

function stop() { S.playing = false; clearInterval(S.timer); S.timer = null; S.dirty = true; }

function play() {
  const v = currentVariant();
  if (!v || !v.frames.length) return;
  if (S.pos === null || S.pos >= v.frames.length - 1) S.pos = 0;
  $("follow").checked = false;
  S.playing = true;
  clearInterval(S.timer);
  S.timer = setInterval(() => {
    const cur = currentVariant();
    if (!cur) return stop();
    if (S.pos >= cur.frames.length - 1) {
      if (S.live) { $("follow").checked = true; S.pos = null; }
      return stop();
    }
    S.pos += 1;
    S.dirty = true;
  }, 1000 / Number($("speed").value));
  S.dirty = true;
}

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.get("variant")) S.hash.variant = p.get("variant");
  if (p.get("frame") !== null && !isNaN(Number(p.get("frame")))) S.hash.frame = Number(p.get("frame"));
}

function setup() {
  readHash();
  $("play").onclick = () => (S.playing ? stop() : play());
  // Moving the slider takes over from playback: a timer still running would step on from where it was put.
  $("slider").oninput = () => { stop(); S.pos = Number($("slider").value); $("follow").checked = false; S.dirty = true; };
  $("follow").onchange = () => { if ($("follow").checked) { S.pos = null; stop(); } S.dirty = true; };
  $("speed").onchange = () => { if (S.playing) play(); };
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" && e.target.type !== "range") return;
    if (e.key === " ") { e.preventDefault(); S.playing ? stop() : play(); }
  });
  const loop = () => { if (S.dirty) render(); requestAnimationFrame(loop); };
  requestAnimationFrame(loop);
  setInterval(() => { if (S.dirty) render(); }, 250);   // a background tab gets no animation frames
  connect();
}

setup();
