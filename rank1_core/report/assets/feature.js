// rank1 feature page: draws the top contexts of both signs and the whole trace from the
// JSON embedded in the page (and the trace tokens in traces/d<doc>.js). Every token is a
// <span> coloured by sign and magnitude, its value in the title (shown on hover).
// Data enters the DOM only through textContent / title / CSSOM colours.
(function () {
  "use strict";
  var d = JSON.parse(document.getElementById("feature-data").textContent);
  // each sign is scaled by its own largest value on the page, so weak positive hits stay
  // visible beside strong negative ones (and the other way round)
  var maxpos = d.maxpos > 0 ? d.maxpos : (d.maxabs > 0 ? d.maxabs : 1);
  var maxneg = d.maxneg > 0 ? d.maxneg : (d.maxabs > 0 ? d.maxabs : 1);
  var toks = d.toks || [];

  function shown(t) {
    // whitespace made visible in the compact context lines
    return t === "" ? "\u2205" : t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  }
  function fmt(v) {
    return v === 0 ? "0" : Number(v).toPrecision(3);
  }
  function colour(v) {
    if (!v) return "";
    var a = Math.min(1, v > 0 ? v / maxpos : -v / maxneg);
    a = Math.pow(a, 0.8) * 0.88;
    if (a < 0.02) return "";
    return (v > 0 ? "rgba(234, 88, 12, " : "rgba(28, 126, 214, ") + a.toFixed(3) + ")";
  }
  function tokenSpan(tok, v, hit, pos, trace) {
    var s = document.createElement("span");
    s.className = "tok" + (hit ? " hit" : "") + (/^<\|.*\|>$/.test(tok) ? " special" : "");
    s.textContent = trace ? (tok === "" ? "\u2205" : tok.replace(/\n/g, "\u21b5\n")) : shown(tok);
    s.title = JSON.stringify(tok) + " = " + fmt(v) + (pos !== null ? "  (pos " + pos + ")" : "");
    s.dataset.v = v;
    var c = colour(v);
    if (c) s.style.backgroundColor = c;
    return s;
  }

  function drawContexts(list, id, countId) {
    var ol = document.getElementById(id);
    var rows = d[list] || [];
    document.getElementById(countId).textContent = rows.length ? "(" + rows.length + ")" : "(none)";
    var frag = document.createDocumentFragment();
    rows.forEach(function (c) {
      // c = [doc, pos, value, hit_index, start_pos, [token indices], [values]]
      var li = document.createElement("li");
      li.className = "ctx";
      var meta = document.createElement("span");
      meta.className = "ctx-meta";
      meta.textContent = fmt(c[2]) + " · doc " + c[0] + ":" + c[1];
      li.appendChild(meta);
      var ids = c[5], vals = c[6];
      for (var i = 0; i < ids.length; i++) {
        li.appendChild(tokenSpan(toks[ids[i]], vals[i], i === c[3], c[4] + i, false));
      }
      frag.appendChild(li);
    });
    ol.appendChild(frag);
  }

  function drawTrace() {
    var box = document.getElementById("trace");
    var note = document.getElementById("trace-note");
    var t = d.trace;
    var store = window.RANK1_TRACES && t ? window.RANK1_TRACES[String(t.doc)] : null;
    if (!t || !store) {
      note.textContent = t ? "(trace tokens missing)" : "(no trace: extract tokens not available)";
      return;
    }
    note.textContent = "(doc " + t.doc + (t.start > 0 || t.end < t.total
      ? ", tokens " + t.start + "\u2013" + t.end + " of " + t.total : ", " + t.total + " tokens") + ")";
    var frag = document.createDocumentFragment();
    for (var p = t.start; p < t.end; p++) {
      var tok = store.tokens[p - store.start];
      if (tok === undefined) tok = "";
      frag.appendChild(tokenSpan(tok, t.vals[p - t.start], p === t.hit, p, true));
    }
    box.appendChild(frag);
    var hit = box.querySelector(".tok.hit");
    if (hit && box.scrollHeight > box.clientHeight) box.scrollTop = hit.offsetTop - box.offsetTop - box.clientHeight / 3;
  }

  drawContexts("pos", "ctx-pos", "n-pos");
  drawContexts("neg", "ctx-neg", "n-neg");
  drawTrace();
  document.body.dataset.ready = "1";
})();
