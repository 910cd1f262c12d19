// rank1 feature index: filter and sort the table embedded as JSON in the page.
// Data enters the DOM only through textContent / attributes, never innerHTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("index-data").textContent);
  var cols = data.columns;
  var CLASS = { 0: "clear", 1: "broad", 2: "polysemantic" };
  var SRC = { adapter: "LoRA component", neuron: "MLP neuron", sae: "SAE feature", transcoder: "transcoder feature" };
  var HREF_OK = /^features\/[A-Za-z0-9_.\/-]+\.html$/;
  var $ = function (id) { return document.getElementById(id); };
  var tbody = $("rows");

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "";
    return Number(v).toPrecision(digits || 3);
  }

  var items = data.rows.map(function (r) {
    var o = {};
    cols.forEach(function (c, i) { o[c] = r[i]; });
    var tr = document.createElement("tr");
    tr.dataset.source = o.source;
    var td = el("td");
    if (o.href && HREF_OK.test(o.href)) {
      var a = el("a", o.id);
      a.href = o.href;
      td.appendChild(a);
    } else {
      td.textContent = o.id;
    }
    tr.appendChild(td);
    var s = el("td");
    s.appendChild(el("span", SRC[o.source] || o.source, "src src-" + String(o.source).replace(/[^a-z]/g, "")));
    tr.appendChild(s);
    tr.appendChild(el("td", o.where));
    var ex = el("td", o.explanation === null ? "—" : o.explanation, "expl" + (o.explanation === null ? " muted" : ""));
    if (o.explanation_neg) {
      ex.appendChild(document.createElement("br"));
      ex.appendChild(el("small", "(−) " + o.explanation_neg, "muted neg-expl"));
    }
    tr.appendChild(ex);
    var c = el("td");
    var k = o.classification === null ? "none" : String(o.classification);
    c.appendChild(el("span", o.classification === null ? "—" : o.classification + " " + CLASS[o.classification], "badge cls-" + k));
    tr.appendChild(c);
    tr.appendChild(el("td", o.category || ""));
    tr.appendChild(el("td", fmt(o.score), "num"));
    tr.appendChild(el("td", fmt(o.max), "num"));
    tr.appendChild(el("td", o.density === null ? "" : (100 * o.density).toPrecision(2) + "%", "num"));
    // best ground-truth concept (concepts stage) and its AUROC; the column sorts by the AUROC
    var gt = el("td", null, "num gt");
    if (o.gt_concept) {
      gt.appendChild(el("span", o.gt_concept + (o.gt_sign === "neg" ? " (\u2212)" : ""), "gt-concept"));
      gt.appendChild(document.createTextNode(" " + fmt(o.gt_auroc)));
    }
    tr.appendChild(gt);
    o.tr = tr;
    o.text = [o.id, o.where, o.explanation || "", o.explanation_neg || "", o.category || "",
              SRC[o.source] || "", o.gt_concept || ""].join(" \u0001 ").toLowerCase();
    return o;
  });

  // options of the source and category filters, from the data
  function addOptions(sel, values, label) {
    values.forEach(function (v) {
      var opt = el("option", label ? label(v) : v);
      opt.value = v;
      sel.appendChild(opt);
    });
  }
  function uniq(key) {
    var seen = {};
    items.forEach(function (o) { if (o[key] !== null && o[key] !== "") seen[o[key]] = 1; });
    return Object.keys(seen).sort();
  }
  addOptions($("source"), uniq("source"), function (v) { return SRC[v] || v; });
  addOptions($("cat"), uniq("category"));

  var frag = document.createDocumentFragment();
  items.forEach(function (o) { frag.appendChild(o.tr); });
  tbody.appendChild(frag);

  function state() {
    return { q: $("q").value.trim().toLowerCase(), source: $("source").value, cls: $("cls").value,
             cat: $("cat").value, min: $("minscore").value, explained: $("explained").checked };
  }
  function apply() {
    var s = state();
    var terms = s.q ? s.q.split(/\s+/) : [];
    var min = s.min === "" ? null : Number(s.min);
    var shown = 0;
    items.forEach(function (o) {
      var ok = (!s.source || o.source === s.source) &&
        (!s.cls || (s.cls === "none" ? o.classification === null : String(o.classification) === s.cls)) &&
        (!s.cat || o.category === s.cat) &&
        (min === null || (o.score !== null && o.score >= min)) &&
        (!s.explained || o.explanation !== null) &&
        terms.every(function (t) { return o.text.indexOf(t) >= 0; });
      o.tr.hidden = !ok;
      if (ok) shown++;
    });
    $("count").textContent = shown + " of " + items.length + " features";
    var params = new URLSearchParams();
    if (s.q) params.set("q", $("q").value.trim());
    ["source", "cls", "cat"].forEach(function (k) { if (s[k]) params.set(k, s[k]); });
    if (s.min !== "") params.set("min", s.min);
    if (s.explained) params.set("explained", "1");
    var h = params.toString();
    try { history.replaceState(null, "", h ? "#" + h : location.pathname); } catch (e) { /* file:// in some browsers */ }
  }

  // restore filters from the URL hash (#q=wait&source=sae)
  (function restore() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (p.has("q")) $("q").value = p.get("q");
    ["source", "cls", "cat"].forEach(function (k) { if (p.has(k)) $(k).value = p.get(k); });
    if (p.has("min")) $("minscore").value = p.get("min");
    $("explained").checked = p.get("explained") === "1";
  })();

  ["q", "minscore"].forEach(function (id) { $(id).addEventListener("input", apply); });
  ["source", "cls", "cat", "explained"].forEach(function (id) { $(id).addEventListener("change", apply); });
  $("filters").addEventListener("submit", function (e) { e.preventDefault(); });
  $("clear-filters").addEventListener("click", function () {
    // (HTMLFormElement.prototype.reset: a control named "reset" would shadow form.reset)
    HTMLFormElement.prototype.reset.call($("filters"));
    apply();
  });

  // sorting: click a header; click again to reverse
  var sortKey = null, sortDir = 1;
  Array.prototype.forEach.call(document.querySelectorAll("table.features th[data-k]"), function (th) {
    th.addEventListener("click", function () {
      var k = th.dataset.k;
      sortDir = sortKey === k ? -sortDir : (["score", "max", "density", "gt_auroc"].indexOf(k) >= 0 ? -1 : 1);
      sortKey = k;
      document.querySelectorAll("table.features th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(sortDir > 0 ? "sorted-asc" : "sorted-desc");
      var sorted = items.slice().sort(function (a, b) {
        var x = a[k], y = b[k];
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        if (k === "id") { x = a.order; y = b.order; }
        return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
      });
      var f = document.createDocumentFragment();
      sorted.forEach(function (o) { f.appendChild(o.tr); });
      tbody.appendChild(f);
    });
  });
  apply();
  document.body.dataset.ready = "1";
})();
