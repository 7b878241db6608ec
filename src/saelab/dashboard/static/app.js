// saelab feature dashboard: a static single page over data/index.js and data/latents/<id>.js.
// Every string from a corpus, a label or a config is put in the page with textContent or
// setAttribute, never parsed as HTML, so a document containing markup renders as text.
"use strict";
(function () {
  const D = window.SAELAB_INDEX;
  const root = document.getElementById("app");
  const cache = {};
  let sortKey = null, sortDir = -1, query = "", shown = 200;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") e.textContent = String(v); else e.setAttribute(k, String(v));
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }
  function fmt(v, kind) {
    if (v === null || v === undefined || v === "") return "";
    if (kind === "num") { const x = Number(v); return Math.abs(x) >= 1000 ? x.toFixed(0) : Math.abs(x) < 0.001 && x !== 0 ? x.toExponential(2) : x.toFixed(4); }
    return String(v);
  }
  function nav() {
    return el("nav", {}, el("a", {href: "#", text: "latents"}), el("a", {href: "#join", text: "join table"}),
      el("a", {href: "data/join.csv", text: "join.csv"}));
  }
  function header() {
    const m = D.meta;
    const box = el("div", {});
    box.append(el("h1", {text: m.title}));
    box.append(el("div", {class: "muted", text: m.subtitle}));
    box.append(nav());
    if (m.missing && m.missing.length) {
      const ul = el("ul", {class: "missing"});
      for (const x of m.missing) ul.append(el("li", {}, x.what + " — run ", el("code", {text: x.command})));
      box.append(el("div", {class: "missing", text: "This run lacks:"}), ul);
    }
    return box;
  }
  function rowsMatching(cols) {
    const q = query.trim().toLowerCase();
    let rows = D.rows;
    if (q) rows = rows.filter(r => cols.some(c => String(r[c.key] ?? "").toLowerCase().includes(q)));
    if (sortKey !== null) {
      const k = sortKey;
      rows = rows.slice().sort((a, b) => {
        const x = a[k], y = b[k];
        if (x === y) return 0;
        if (x === null || x === undefined || x === "") return 1;
        if (y === null || y === undefined || y === "") return -1;
        return (x < y ? -1 : 1) * sortDir;
      });
    }
    return rows;
  }
  function table(cols, view) {
    const wrap = el("div", {});
    const search = el("input", {type: "search", id: "search", placeholder: "search ids, explanations, tokens…", value: query});
    const count = el("span", {class: "muted", id: "count"});
    const holder = el("div", {class: "wrap"});
    function draw() {
      const rows = rowsMatching(cols);
      count.textContent = `  ${rows.length} of ${D.rows.length} latents`;
      const t = el("table", {id: "latents"});
      const hr = el("tr", {});
      for (const c of cols) {
        const th = el("th", {title: c.help || "", "data-key": c.key, text: c.label + (sortKey === c.key ? (sortDir > 0 ? " ▲" : " ▼") : "")});
        th.addEventListener("click", () => { if (sortKey === c.key) sortDir = -sortDir; else { sortKey = c.key; sortDir = c.kind === "num" ? -1 : 1; } draw(); });
        hr.append(th);
      }
      t.append(hr);
      for (const r of rows.slice(0, shown)) {
        const tr = el("tr", {});
        for (const c of cols) {
          const v = r[c.key];
          if (c.key === "id") tr.append(el("td", {class: "num"}, el("a", {href: "#latent/" + v, text: v})));
          else tr.append(el("td", {class: c.kind === "num" ? "num" : null, text: fmt(v, c.kind)}));
        }
        t.append(tr);
      }
      holder.replaceChildren(t);
      if (rows.length > shown) {
        const more = el("button", {id: "more", text: `show ${Math.min(1000, rows.length - shown)} more`});
        more.addEventListener("click", () => { shown += 1000; draw(); });
        holder.append(more);
      }
    }
    search.addEventListener("input", () => { query = search.value; shown = 200; draw(); });
    wrap.append(el("div", {}, search, count), holder);
    draw();
    return wrap;
  }
  function viewIndex() {
    root.replaceChildren(header(), el("h2", {text: "Latents"}), table(D.columns.filter(c => c.index), "index"));
  }
  function viewJoin() {
    root.replaceChildren(header(), el("h2", {text: "Join: every result per latent"}),
      el("p", {class: "muted", text: D.meta.join_note}), table(D.columns, "join"));
  }
  function histogram(h) {
    const NS = "http://www.w3.org/2000/svg", W = 420, H = 140, n = h.counts.length, top = Math.max(1, ...h.counts);
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H + 22}`); svg.setAttribute("width", W); svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "activation histogram");
    h.counts.forEach((c, i) => {
      const r = document.createElementNS(NS, "rect"), bw = W / n, bh = (H - 4) * c / top;
      r.setAttribute("x", i * bw); r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("y", H - bh); r.setAttribute("height", bh);
      r.setAttribute("fill", "#f28c28");
      const tt = document.createElementNS(NS, "title");
      tt.textContent = `${h.edges[i].toFixed(3)}–${h.edges[i + 1].toFixed(3)}: ${c}`;
      r.append(tt); svg.append(r);
    });
    for (const [x, v, a] of [[0, h.edges[0], "start"], [W, h.edges[n], "end"]]) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", x); t.setAttribute("y", H + 16); t.setAttribute("font-size", "11"); t.setAttribute("text-anchor", a);
      t.textContent = v.toFixed(3); svg.append(t);
    }
    return svg;
  }
  function example(w, maxAct) {
    const div = el("div", {class: "ex"});
    div.append(el("span", {class: "src", text: w.s}));
    w.t.forEach((tok, i) => {
      const a = w.a[i] || 0, alpha = maxAct > 0 ? Math.min(1, Math.max(0, a / maxAct)) : 0;
      const s = el("span", {class: "tok" + (i === w.c ? " c" : ""), title: `${JSON.stringify(tok)}  ${a.toFixed(4)}`,
        "data-act": a.toFixed(4), text: tok.replace(/\n/g, "↵")});
      if (a > 0) s.style.background = `rgba(242,140,40,${(0.15 + 0.85 * alpha).toFixed(3)})`;
      div.append(s);
    });
    return div;
  }
  function viewLatent(id) {
    const L = cache[id];
    const r = D.rows.find(x => String(x.id) === String(id)) || {};
    const box = el("div", {id: "latent-page"});
    box.append(header(), el("h2", {text: `Latent ${id}`}));
    if (!L) { box.append(el("p", {class: "missing", text: `no page data for latent ${id} (not alive in the examples pass?)`})); root.replaceChildren(box); return; }
    const st = L.stats;
    box.append(el("p", {}, el("span", {class: "big", text: L.explanation ? L.explanation.label : "(no explanation)"}),
      el("br"), el("span", {class: "muted", text: `density ${fmt(st.density, "num")} · mean activation ${fmt(st.mean_activation, "num")} · max ${fmt(st.max_activation, "num")} · fired in ${st.fire_contexts} contexts`})));
    const cols = el("div", {class: "cols"});
    const hist = el("div", {}, el("h3", {text: "Activation histogram"}), histogram(L.hist), el("div", {class: "muted", text: L.hist.what}));
    const lens = el("div", {}, el("h3", {text: "Logit lens"}));
    for (const [name, cls] of [["promoted", "pos"], ["suppressed", "neg"]]) {
      const p = el("div", {}, el("span", {class: "muted", text: name + ": "}));
      for (const [tok, s] of (L.lens[name] || [])) p.append(el("span", {class: "pill " + cls, title: String(s), text: tok}));
      lens.append(p);
    }
    const nb = el("div", {}, el("h3", {text: "Nearest latents (decoder cosine)"}));
    for (const [j, c] of L.neighbours) nb.append(el("a", {class: "pill", href: "#latent/" + j, text: `${j} (${c.toFixed(3)})`}));
    const dom = el("div", {}, el("h3", {text: "Corpus domains of its contexts"}));
    const dt = el("table", {});
    for (const [k, v] of Object.entries(L.domains)) dt.append(el("tr", {}, el("td", {text: k}), el("td", {class: "num", text: v})));
    dom.append(dt, el("div", {class: "muted", text: L.domains_what}));
    cols.append(hist, lens, nb, dom);
    box.append(cols);
    if (L.explanation) {
      const e = L.explanation, t = el("table", {id: "scores"});
      t.append(el("tr", {}, el("th", {text: "explanation"}), el("th", {text: "label"})));
      for (const [k, v] of Object.entries(e.all)) t.append(el("tr", {}, el("td", {text: k}), el("td", {text: v})));
      const s = el("table", {});
      s.append(el("tr", {}, el("th", {text: "score"}), el("th", {text: "value"})));
      for (const [k, v] of Object.entries(e.scores)) s.append(el("tr", {}, el("td", {text: k}), el("td", {class: "num", text: fmt(v, "num")})));
      box.append(el("h3", {text: "Explanation and scores"}), el("div", {class: "cols"}, t, s));
    } else {
      box.append(el("p", {class: "missing"}, "No explanation for this latent — run ", el("code", {text: D.meta.interpret_command})));
    }
    if (L.join && Object.keys(L.join).length) {
      const t = el("table", {});
      for (const [k, v] of Object.entries(L.join)) t.append(el("tr", {}, el("td", {text: k}), el("td", {text: fmt(v, typeof v === "number" ? "num" : "text")})));
      box.append(el("h3", {text: "Other results for this latent"}), t);
    }
    box.append(el("h3", {text: "Top activating contexts"}));
    const tops = el("div", {id: "top-examples"});
    for (const w of L.top) tops.append(example(w, st.max_activation));
    box.append(tops);
    box.append(el("h3", {text: "Quantile bands"}), el("div", {class: "muted", text: L.bands_what}));
    for (const b of L.bands) {
      box.append(el("div", {class: "muted", text: `band ${b.band + 1}: activations ${b.lo.toFixed(3)}–${b.hi.toFixed(3)} (${b.n} sampled contexts in the band)`}));
      for (const w of b.windows) box.append(example(w, st.max_activation));
    }
    root.replaceChildren(box);
  }
  window.SAELAB_LATENT = function (id, data) { cache[id] = data; const m = location.hash.match(/^#latent\/(\d+)/); if (m && m[1] === String(id)) viewLatent(id); };
  function loadLatent(id) {
    if (cache[id]) { viewLatent(id); return; }
    root.replaceChildren(header(), el("p", {class: "muted", text: `loading latent ${id}…`}));
    const s = document.createElement("script");
    s.src = `data/latents/${id}.js`;
    s.onerror = () => { cache[id] = null; viewLatent(id); };
    document.head.append(s);
  }
  function route() {
    const h = location.hash;
    const m = h.match(/^#latent\/(\d+)$/);
    if (m) loadLatent(m[1]); else if (h === "#join") viewJoin(); else viewIndex();
    window.scrollTo(0, 0);
  }
  window.addEventListener("hashchange", route);
  route();
})();
