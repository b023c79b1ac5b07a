/* pkstrace report: draw the figures, sortable tables, keyboard navigation.
   Figure specs are read with textContent + JSON.parse (never innerHTML), and no
   string from the trace is ever inserted as HTML. */
(function () {
  "use strict";
  var specs = JSON.parse(document.getElementById("pkstrace-figures").textContent);
  var base = {
    margin: { l: 70, r: 20, t: 48, b: 50 },
    font: { family: "system-ui, sans-serif", size: 12 },
    hoverlabel: { namelength: -1 },
    legend: { font: { size: 11 } },
    paper_bgcolor: "#ffffff", plot_bgcolor: "#ffffff"
  };
  // Side by side (comparison), a figure is half as wide: legends go below it.
  if (document.documentElement.getAttribute("data-mode") === "comparison") {
    base.legend = { font: { size: 11 }, orientation: "h", y: -0.25, x: 0 };
  }
  var config = { displaylogo: false, responsive: true, scrollZoom: false,
                 modeBarButtonsToRemove: ["sendDataToCloud"] };
  function merge(a, b) {
    var out = {}, k;
    for (k in a) { out[k] = a[k]; }
    for (k in b) {
      if (b[k] && typeof b[k] === "object" && !Array.isArray(b[k]) && out[k] &&
          typeof out[k] === "object") { out[k] = merge(out[k], b[k]); } else { out[k] = b[k]; }
    }
    return out;
  }
  document.querySelectorAll("div.plot[data-fig]").forEach(function (div) {
    var spec = specs[div.getAttribute("data-fig")];
    if (!spec) { return; }
    var layout = merge(base, spec.layout);
    if (base.legend.orientation === "h" && spec.data.length > 1) {
      layout.height = (layout.height || 360) + 30 + 18 * Math.ceil(spec.data.length / 2);
      layout.margin = merge(layout.margin || {}, { b: 90 });
    }
    ["xaxis", "yaxis"].forEach(function (ax) {
      layout[ax] = merge({ gridcolor: "#eaeef2", zerolinecolor: "#d0d7de", automargin: true },
                         layout[ax] || {});
    });
    Plotly.newPlot(div, spec.data, layout, config);
  });

  /* Sortable tables: click or Enter/Space on a header. Numbers sort by data-v. */
  function cellKey(td, numeric) {
    if (numeric) {
      var v = td.getAttribute("data-v");
      return v === null || v === "" ? NaN : parseFloat(v);
    }
    return td.textContent.toLowerCase();
  }
  function sortBy(th) {
    var table = th.closest("table");
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var numeric = rows.some(function (r) { return r.cells[idx] && r.cells[idx].hasAttribute("data-v"); });
    var asc = th.getAttribute("aria-sort") !== "ascending";
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.setAttribute("aria-sort", "none"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    rows.sort(function (a, b) {
      var x = cellKey(a.cells[idx], numeric), y = cellKey(b.cells[idx], numeric);
      if (numeric) {
        if (isNaN(x)) { return isNaN(y) ? 0 : 1; }
        if (isNaN(y)) { return -1; }
        return asc ? x - y : y - x;
      }
      return asc ? (x < y ? -1 : x > y ? 1 : 0) : (x < y ? 1 : x > y ? -1 : 0);
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
    });
  });

  /* j / k: next / previous view (not while typing in a field). */
  var sections = Array.prototype.slice.call(document.querySelectorAll("main > section"));
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey) { return; }
    var t = e.target.tagName;
    if (t === "INPUT" || t === "TEXTAREA" || t === "SELECT") { return; }
    if (e.key !== "j" && e.key !== "k") { return; }
    var y = window.scrollY + 120, i, cur = 0;
    for (i = 0; i < sections.length; i++) { if (sections[i].offsetTop <= y) { cur = i; } }
    var next = e.key === "j" ? Math.min(cur + 1, sections.length - 1) : Math.max(cur - 1, 0);
    sections[next].scrollIntoView();
    var h = sections[next].querySelector("h2");
    if (h) { h.setAttribute("tabindex", "-1"); h.focus({ preventScroll: true }); }
  });
})();
