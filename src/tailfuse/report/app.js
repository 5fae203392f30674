// tailfuse review page: gallery per tail label, paging, sorting, accept / reject, export of the decisions as CSV.
// Everything it shows comes from data.js (window.TAILFUSE_DATA); decisions live in memory and in this browser's
// localStorage (per set), until exported.
(function () {
  "use strict";
  const D = window.TAILFUSE_DATA;
  const $ = (id) => document.getElementById(id);
  const storeKey = "tailfuse-decisions-" + D.set_id;
  const decisions = JSON.parse(localStorage.getItem(storeKey) || "{}"); // id -> {decision, reviewer, decided_at}
  const history = []; // for undo: [id, previous decision or null]
  const state = { label: "", sort: "id", desc: false, page: 0, focus: 0 };

  function save() { localStorage.setItem(storeKey, JSON.stringify(decisions)); }
  function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
  function decisionOf(it) {
    if (decisions[it.id]) return decisions[it.id].decision;
    return it.imported ? it.imported.decision : null;
  }

  // ---- overview
  function overview() {
    const h = [];
    h.push(`<p><b>Data</b>: ${esc(D.dataset || "")} &middot; <b>run</b>: ${esc(D.run)} &middot; set <b>${esc(D.set)}</b>
      (${D.items.length} images, made by <code>${esc(D.kind)}</code>) &middot; report of ${esc(D.generated_at)}</p>`);
    h.push(`<p><b>Head labels</b>: ${D.head.map(esc).join(", ")} &middot; <b>tail labels</b>: ${D.tail.map(esc).join(", ")}
      &middot; ${D.multi_label ? "multi-label" : "multi-class"}</p>`);
    h.push("<table><tr><th>label</th><th>real training images</th><th>synthetic added</th><th>after</th></tr>" +
      D.labels.map((l) => `<tr><td>${esc(l)}${D.tail.includes(l) ? " (tail)" : ""}</td><td>${D.counts_before[l]}</td>` +
        `<td>${D.added[l] || 0}</td><td>${D.counts_before[l] + (D.added[l] || 0)}</td></tr>`).join("") + "</table>");
    h.push(`<img src="overview/counts.png" alt="class counts before and after">`);
    h.push(`<p><b>Hashes</b>: VAE ${esc(D.hashes.vae_name || "")} <code>${esc((D.hashes.vae || "").slice(0, 16))}</code>,
      model <code>${esc((D.hashes.model || "").slice(0, 16))}</code></p>`);
    h.push(`<details><summary>Settings</summary><pre>${esc(JSON.stringify(D.settings, null, 2))}</pre></details>`);
    if (D.evaluation) {
      h.push(`<details open><summary>Evaluation (<code>tailfuse evaluate</code>)</summary>${D.evaluation.html}` +
        D.evaluation.plots.map((p) => `<img src="${esc(p)}" alt="${esc(p)}">`).join("") + "</details>");
    } else {
      h.push("<p>No evaluation yet: <code>tailfuse evaluate --run ...</code> measures whether these images help.</p>");
    }
    $("overview-body").innerHTML = h.join("\n");
  }

  // ---- selection, sorting, paging
  function visible() {
    let items = D.items.filter((it) => !state.label || it.tail_label === state.label);
    const k = state.sort;
    items = items.slice().sort((a, b) => {
      const x = a[k] === undefined || a[k] === null ? -Infinity : a[k];
      const y = b[k] === undefined || b[k] === null ? -Infinity : b[k];
      return (x < y ? -1 : x > y ? 1 : a.id - b.id) * (state.desc ? -1 : 1);
    });
    return items;
  }

  function counter() {
    let acc = 0, rej = 0;
    for (const it of D.items) {
      const d = decisionOf(it);
      if (d === "accept") acc++;
      else if (d === "reject") rej++;
    }
    $("counter").textContent = `reviewed ${acc + rej} of ${D.items.length} (accepted ${acc}, rejected ${rej})`;
  }

  function card(it, idx) {
    const d = decisionOf(it);
    const fig = (src, cap, cls) => src ? `<figure class="${cls || ""}"><img src="${esc(src)}" alt="${esc(cap)}" class="${cls === "grid" ? "grid" : ""}"><figcaption>${esc(cap)}</figcaption></figure>` : "";
    const parts = [fig(it.img, "synthetic #" + it.id, "main")];
    if (it.tail) {
      parts.push(fig(it.tail.img, "tail source #" + it.tail.id));
      parts.push(it.tail.map ? `<figure><img class="grid" src="${esc(it.tail.map)}" alt="tail saliency"><figcaption>tail map</figcaption></figure>` : "");
      parts.push(fig(it.head.img, "head source #" + it.head.id));
      parts.push(it.head.map ? `<figure><img class="grid" src="${esc(it.head.map)}" alt="head saliency"><figcaption>head map</figcaption></figure>` : "");
      parts.push(it.mask ? `<figure><img class="grid" src="${esc(it.mask)}" alt="fusion mask"><figcaption>mask (white: tail)</figcaption></figure>` : "");
    }
    const meta = [`<span><b>${esc(it.tail_label)}</b>; labels ${esc(it.labels.join(", "))}</span>`,
      `<span>tail probability ${it.tail_prob.toFixed(3)}</span>`,
      `<span>nearest real image ${it.nn_distance.toFixed(2)} (ratio ${it.nn_ratio.toFixed(2)})</span>`];
    if (it.near_copy) meta.push('<span class="warn">near-copy of a real image</span>');
    if (it.tail_share !== undefined && it.tail_share !== null && !Number.isNaN(it.tail_share)) meta.push(`<span>tail share ${it.tail_share}</span>`);
    if (it.refine) meta.push(`<span>refined ${esc(it.refine.refine_d)}/${esc(it.refine.refine_n)}, guidance ${esc(it.refine.guidance)}</span>`);
    const imported = it.imported ? `<span class="imported">imported: ${esc(it.imported.decision)} by ${esc(it.imported.reviewer || "?")} (${esc(it.imported.decided_at)})</span>` : "";
    return `<article class="card ${d || ""} ${idx === state.focus ? "focus" : ""}" data-id="${it.id}" data-idx="${idx}" tabindex="-1">
      <div class="row">${parts.join("")}</div>
      <div class="meta">${meta.join("")}</div>
      <div class="buttons"><button type="button" data-act="accept">Accept (a)</button>
        <button type="button" data-act="reject">Reject (r)</button>
        <span class="state">${d ? d + "ed" : "not reviewed"}</span> ${imported}</div></article>`;
  }

  function render() {
    const items = visible();
    const pages = Math.max(1, Math.ceil(items.length / D.per_page));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * D.per_page;
    const shown = items.slice(start, start + D.per_page);
    state.focus = Math.min(state.focus, Math.max(0, shown.length - 1));
    $("gallery").innerHTML = shown.map((it, i) => card(it, i)).join("");
    const pager = Array.from({ length: pages }, (_, i) =>
      `<button type="button" data-page="${i}" class="${i === state.page ? "current" : ""}">${i + 1}</button>`).join("");
    $("pager-top").innerHTML = $("pager-bottom").innerHTML = pages > 1 ? pager : "";
    counter();
  }

  // ---- decisions
  function decide(id, decision) {
    const prev = decisions[id] ? decisions[id].decision : null;
    history.push([id, prev]);
    decisions[id] = { decision, reviewer: $("reviewer").value.trim(), decided_at: new Date().toISOString() };
    save();
  }
  function undo() {
    const last = history.pop();
    if (!last) return;
    if (last[1] === null) delete decisions[last[0]];
    else decisions[last[0]].decision = last[1];
    save();
    render();
  }
  function rejectBelow() {
    const key = $("below-key").value;
    const v = parseFloat($("below-value").value);
    if (Number.isNaN(v)) return;
    for (const it of D.items) {
      if ((!state.label || it.tail_label === state.label) && it[key] < v && decisionOf(it) !== "reject") decide(it.id, "reject");
    }
    render();
  }
  function exportCsv() {
    const rows = ["set_id,synth_id,decision,reviewer,decided_at"];
    const ids = Object.keys(decisions).map(Number).sort((a, b) => a - b);
    for (const id of ids) {
      const d = decisions[id];
      const q = (s) => '"' + String(s || "").replace(/"/g, '""') + '"';
      rows.push([D.set_id, id, d.decision, q(d.reviewer), q(d.decided_at)].join(","));
    }
    const blob = new Blob([rows.join("\n") + "\n"], { type: "text/csv" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `decisions-${D.set.replace(/[^A-Za-z0-9_.-]/g, "_")}.csv`;
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  // ---- wiring
  function init() {
    $("set-name").textContent = D.set;
    $("label").innerHTML = '<option value="">all tail labels</option>' +
      D.tail.map((l) => `<option value="${esc(l)}">${esc(l)} (${D.items.filter((it) => it.tail_label === l).length})</option>`).join("");
    $("reviewer").value = localStorage.getItem("tailfuse-reviewer") || "";
    $("reviewer").addEventListener("change", () => localStorage.setItem("tailfuse-reviewer", $("reviewer").value));
    $("label").addEventListener("change", (e) => { state.label = e.target.value; state.page = 0; render(); });
    $("sort").addEventListener("change", (e) => { state.sort = e.target.value; render(); });
    $("descending").addEventListener("change", (e) => { state.desc = e.target.checked; render(); });
    $("reject-below").addEventListener("click", rejectBelow);
    $("export").addEventListener("click", exportCsv);
    document.addEventListener("click", (e) => {
      const b = e.target.closest("button");
      if (!b) return;
      if (b.dataset.page !== undefined) { state.page = Number(b.dataset.page); state.focus = 0; render(); return; }
      const c = b.closest(".card");
      if (c && b.dataset.act) { state.focus = Number(c.dataset.idx); decide(Number(c.dataset.id), b.dataset.act); render(); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
      const cards = document.querySelectorAll(".card");
      const cur = cards[state.focus];
      const k = e.key;
      if (k === "a" || k === "r") { if (cur) { decide(Number(cur.dataset.id), k === "a" ? "accept" : "reject"); state.focus = Math.min(state.focus + 1, cards.length - 1); render(); } }
      else if (k === "u") undo();
      else if (k === "j" || k === "ArrowDown" || k === "ArrowRight") { state.focus = Math.min(state.focus + 1, cards.length - 1); render(); }
      else if (k === "k" || k === "ArrowUp" || k === "ArrowLeft") { state.focus = Math.max(state.focus - 1, 0); render(); }
      else if (k === "n" || k === "p") { state.page += k === "n" ? 1 : -1; state.page = Math.max(0, state.page); state.focus = 0; render(); }
      else return;
      e.preventDefault();
      const f = document.querySelector(".card.focus");
      if (f) f.scrollIntoView({ block: "nearest" });
    });
    overview();
    render();
  }
  init();
  window.tailfuseReview = { decisions, render, exportCsv }; // for tests and the console
})();
