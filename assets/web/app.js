// fruits-flow's page: plain JavaScript, no dependency. The data is inlined by `report`
// (window.__DATA) or fetched from `serve` (api/map), which the page then follows.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const SVGNS = 'http://www.w3.org/2000/svg';
  const offline = window.__DATA !== null;
  let data = null;
  const st = { wanted: 'tsne', colour: 'label', filter: '', only: -1, zoom: 1, panX: 0, panY: 0, pinned: -1 };
  let screen = null; // per point: [x, y] in CSS pixels, or null when hidden
  let grid = null;
  let visible = null; // per point: does it pass the filter
  let matches = null; // per label: does it pass the filter

  // Up to 20 labels: the report's PNG palette (Tableau 20, dark shades first). Hundreds:
  // golden-angle hues with three lightness bands keep neighbours apart.
  const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
    '#bcbd22', '#17becf', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5', '#c49c94', '#f7b6d2',
    '#c7c7c7', '#dbdb8d', '#9edae5'];
  function colourOf(i) {
    if (data && data.labels.length <= PALETTE.length) return PALETTE[i];
    const h = (i * 137.508) % 360;
    const l = [45, 62, 32][i % 3];
    const s = [70, 60, 80][Math.floor(i / 3) % 3];
    return 'hsl(' + h.toFixed(1) + ',' + s + '%,' + l + '%)';
  }
  // Clusters: the same palette as the PNG (then golden-angle hues).
  function clusterColour(c) {
    if (c < PALETTE.length) return PALETTE[c];
    return 'hsl(' + ((c * 137.508 + 200) % 360).toFixed(1) + ',' + (c % 2 ? 55 : 75) + '%,' + (c % 2 ? 38 : 50) + '%)';
  }
  function esc(s) {
    return String(s).replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' }[c]));
  }
  function el(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pct(x) { return (x * 100).toFixed(1) + ' %'; }

  function projection() {
    return st.wanted === 'tsne' && data.tsne ? 'tsne' : 'pc';
  }

  function computeFilter() {
    const q = st.filter.trim().toLowerCase();
    matches = data.labels.map((l, i) => (st.only < 0 || st.only === i) && (!q || l.toLowerCase().includes(q)));
    visible = data.label.map((l) => matches[l]);
  }

  // ---- the map ----
  const canvas = $('map');
  const ctx = canvas.getContext('2d');
  function layout() {
    const r = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(r.width * dpr));
    canvas.height = Math.max(1, Math.round(r.height * dpr));
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return r;
  }
  function draw() {
    if (!data) return;
    const r = layout();
    const w = r.width, h = r.height, pad = 14;
    ctx.clearRect(0, 0, w, h);
    const xy = data[projection()].xy;
    const n = data.keys.length;
    const side = Math.min(w, h) - 2 * pad;
    const ox = (w - side) / 2, oy = (h - side) / 2;
    screen = new Array(n);
    const cell = 12;
    grid = new Map();
    const colours = st.colour === 'label' ? data.labels.map((_, i) => colourOf(i)) :
      Array.from({ length: data.clusters }, (_, i) => clusterColour(i));
    const size = n > 5000 ? 2.5 : n > 500 ? 3.5 : 5;
    // Points that do not pass the filter first, in grey, then the others by colour.
    const groups = new Map();
    ctx.fillStyle = '#ddd';
    for (let i = 0; i < n; i++) {
      const x = ox + ((xy[2 * i] / 9999) * side - side / 2) * st.zoom + side / 2 + st.panX;
      const y = oy + ((1 - xy[2 * i + 1] / 9999) * side - side / 2) * st.zoom + side / 2 + st.panY;
      if (x < -5 || y < -5 || x > w + 5 || y > h + 5) { screen[i] = null; continue; }
      screen[i] = [x, y];
      if (!visible[i]) { ctx.fillRect(x - size / 2, y - size / 2, size, size); continue; }
      const g = st.colour === 'label' ? data.label[i] : data.cluster[i];
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(i);
      const key = Math.floor(x / cell) + ',' + Math.floor(y / cell);
      if (!grid.has(key)) grid.set(key, []);
      grid.get(key).push(i);
    }
    for (const [g, idx] of groups) {
      ctx.fillStyle = g < 0 ? '#999' : colours[g];
      for (const i of idx) {
        const [x, y] = screen[i];
        ctx.beginPath();
        ctx.arc(x, y, size / 2 + 0.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    if (st.pinned >= 0 && screen[st.pinned]) {
      const [x, y] = screen[st.pinned];
      ctx.strokeStyle = '#000';
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(x, y, size + 4, 0, 2 * Math.PI);
      ctx.stroke();
    }
    window.__map.points = n;
    window.__map.projection = projection();
    window.__map.drawn = groups.size;
  }
  function nearest(mx, my) {
    if (!grid) return -1;
    const cell = 12, cx = Math.floor(mx / cell), cy = Math.floor(my / cell);
    let best = -1, bestD = 10 * 10;
    for (let dx = -1; dx <= 1; dx++) {
      for (let dy = -1; dy <= 1; dy++) {
        for (const i of grid.get((cx + dx) + ',' + (cy + dy)) || []) {
          const [x, y] = screen[i];
          const d = (x - mx) * (x - mx) + (y - my) * (y - my);
          if (d < bestD) { bestD = d; best = i; }
        }
      }
    }
    return best;
  }
  function thumbUrl(i) { return 'thumb?key=' + encodeURIComponent(data.keys[i]); }
  function describe(i) {
    const c = data.cluster[i];
    return [['label', data.labels[data.label[i]]], ['cluster', c < 0 ? 'none' : String(c)], ['key', data.keys[i]]];
  }
  function setImage(img, i) {
    if (offline) { img.hidden = true; return; }
    img.hidden = false;
    const url = thumbUrl(i);
    if (img.getAttribute('src') !== url) img.src = url;
  }
  function showTip(i, mx, my) {
    const tip = $('tip');
    if (i < 0) { tip.hidden = true; window.__map.hovered = -1; return; }
    setImage($('tip-img'), i);
    $('tip-text').innerHTML = describe(i).map(([k, v]) => '<b>' + k + '</b> ' + esc(v)).join('<br>') +
      (offline ? '<br><i>photos show when the page is served</i>' : '');
    tip.hidden = false;
    const box = canvas.getBoundingClientRect();
    tip.style.left = Math.min(mx + 14, box.width - 270) + 'px';
    tip.style.top = Math.min(my + 14, box.height - 160) + 'px';
    window.__map.hovered = i;
  }
  function pin(i) {
    st.pinned = i;
    const p = $('pinned');
    if (i < 0) { p.hidden = true; draw(); return; }
    setImage($('pinned-img'), i);
    $('pinned-text').innerHTML = describe(i).map(([k, v]) => '<dt>' + k + '</dt><dd>' + esc(v) + '</dd>').join('');
    p.hidden = false;
    draw();
  }
  let drag = null;
  canvas.addEventListener('mousemove', (e) => {
    const r = canvas.getBoundingClientRect();
    const mx = e.clientX - r.left, my = e.clientY - r.top;
    if (drag) {
      st.panX = drag.panX + (e.clientX - drag.x);
      st.panY = drag.panY + (e.clientY - drag.y);
      drag.moved = true;
      draw();
      return;
    }
    showTip(nearest(mx, my), mx, my);
  });
  canvas.addEventListener('mouseleave', () => { drag = null; showTip(-1); });
  canvas.addEventListener('mousedown', (e) => { drag = { x: e.clientX, y: e.clientY, panX: st.panX, panY: st.panY, moved: false }; });
  canvas.addEventListener('mouseup', (e) => {
    const moved = drag && drag.moved;
    drag = null;
    if (moved) return;
    const r = canvas.getBoundingClientRect();
    pin(nearest(e.clientX - r.left, e.clientY - r.top));
  });
  canvas.addEventListener('wheel', (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    const mx = e.clientX - r.left - r.width / 2, my = e.clientY - r.top - r.height / 2;
    const f = e.deltaY < 0 ? 1.25 : 0.8;
    const z = Math.min(64, Math.max(1, st.zoom * f));
    const k = z / st.zoom;
    st.panX = mx - (mx - st.panX) * k;
    st.panY = my - (my - st.panY) * k;
    st.zoom = z;
    if (z === 1) { st.panX = 0; st.panY = 0; }
    draw();
  }, { passive: false });
  canvas.addEventListener('dblclick', () => { st.zoom = 1; st.panX = 0; st.panY = 0; draw(); });
  window.addEventListener('resize', () => draw());

  // ---- the legend ----
  function legend() {
    const ul = $('legend');
    ul.textContent = '';
    const byLabel = st.colour === 'label';
    const names = byLabel ? data.labels : Array.from({ length: data.clusters }, (_, i) => 'cluster ' + i);
    const counts = byLabel ? data.label_counts : names.map((_, c) => data.table.filter((t) => t[0] === c).reduce((a, t) => a + t[2], 0));
    let shown = 0;
    names.forEach((name, i) => {
      if (byLabel && !matches[i]) return;
      shown++;
      const li = document.createElement('li');
      if (byLabel && st.only === i) li.className = 'on';
      const sw = document.createElement('span');
      sw.className = 'sw';
      sw.style.background = byLabel ? colourOf(i) : clusterColour(i);
      const t = document.createElement('span');
      t.textContent = name;
      const c = document.createElement('span');
      c.className = 'n';
      c.textContent = counts[i];
      li.append(sw, t, c);
      if (byLabel) li.addEventListener('click', () => { st.only = st.only === i ? -1 : i; refresh(); });
      ul.append(li);
    });
    $('legend-head').textContent = byLabel ?
      shown + ' of ' + data.labels.length + ' labels' + (st.only >= 0 ? ' (click again to show all)' : '') :
      data.clusters + ' clusters (colours); the filter still applies to labels';
  }

  // ---- the explained-variance curve ----
  function variance() {
    const svg = $('variance');
    svg.textContent = '';
    const v = data.variance, n = v.length, W = 900, H = 340, L = 50, R = 20, T = 15, B = 40;
    const x = (i) => L + (i / Math.max(1, n)) * (W - L - R);
    const y = (f) => T + (1 - f) * (H - T - B);
    svg.append(el('line', { x1: L, y1: y(0), x2: W - R, y2: y(0), class: 'axis' }), el('line', { x1: L, y1: y(0), x2: L, y2: y(1), class: 'axis' }));
    for (const f of [0, 0.25, 0.5, 0.75, 1]) svg.append(el('text', { x: L - 6, y: y(f) + 4, 'text-anchor': 'end' }, f.toFixed(2)));
    const step = Math.max(1, Math.ceil(n / 10));
    for (let i = step; i <= n; i += step) svg.append(el('text', { x: x(i), y: H - B + 16, 'text-anchor': 'middle' }, String(i)));
    svg.append(el('text', { x: (W + L) / 2, y: H - 4, 'text-anchor': 'middle' }, 'number of principal components'));
    let sum = 0;
    const cum = v.map((r) => (sum += r));
    svg.append(el('line', { x1: L, y1: y(data.target), x2: W - R, y2: y(data.target), stroke: '#999', 'stroke-dasharray': '4 4' }));
    svg.append(el('text', { x: W - R, y: y(data.target) - 4, 'text-anchor': 'end' }, 'target ' + pct(data.target)));
    svg.append(el('polyline', { points: v.map((r, i) => x(i + 1) + ',' + y(r)).join(' '), fill: 'none', stroke: '#e8802a', 'stroke-width': 2 }));
    svg.append(el('polyline', { points: cum.map((r, i) => x(i + 1) + ',' + y(r)).join(' '), fill: 'none', stroke: '#2a6fb0', 'stroke-width': 3 }));
    cum.forEach((r, i) => {
      const c = el('circle', { cx: x(i + 1), cy: y(r), r: 4, fill: '#2a6fb0', 'fill-opacity': 0.01 });
      c.append(el('title', {}, 'component ' + (i + 1) + ': ' + pct(v[i]) + ', cumulative ' + pct(r)));
      svg.append(c);
    });
    svg.append(el('line', { x1: x(data.k), y1: y(0), x2: x(data.k), y2: y(1), stroke: '#c33', 'stroke-width': 2 }));
    svg.append(el('text', { x: x(data.k) + 6, y: y(0.5), fill: '#c33' }, 'k = ' + data.k + ' (' + pct(data.explained) + ')'));
    svg.append(el('text', { x: W - R, y: y(0.12), 'text-anchor': 'end', fill: '#2a6fb0' }, 'cumulative'));
    svg.append(el('text', { x: W - R, y: y(0.05), 'text-anchor': 'end', fill: '#e8802a' }, 'per component'));
  }

  // ---- the cluster x label table (one row per label: hundreds of labels stay readable) ----
  function table() {
    const t = $('table');
    const k = data.clusters;
    const cells = data.labels.map(() => new Array(k).fill(0));
    for (const [c, l, n] of data.table) if (c < k) cells[l][c] = n;
    let html = '<tr><th class="l">label \\ cluster</th>';
    for (let c = 0; c < k; c++) html += '<th><span class="sw" style="background:' + clusterColour(c) + '"></span> ' + c + '</th>';
    html += '<th>total</th></tr>';
    data.labels.forEach((name, l) => {
      if (!matches[l]) return;
      const total = cells[l].reduce((a, b) => a + b, 0);
      html += '<tr><th class="l">' + esc(name) + '</th>';
      for (let c = 0; c < k; c++) {
        const n = cells[l][c];
        const share = total ? n / total : 0;
        html += '<td style="background:rgba(42,111,176,' + (share * 0.8).toFixed(2) + ')">' + (n || '') + '</td>';
      }
      html += '<td>' + total + '</td></tr>';
    });
    t.innerHTML = html;
  }

  // ---- images per label over the epochs ----
  function history() {
    const svg = $('history');
    svg.textContent = '';
    const h = data.history, W = 900, H = 340, L = 60, R = 20, T = 15, B = 40;
    if (!h.epochs.length) return;
    const e0 = h.epochs[0], e1 = Math.max(e0 + 1, h.epochs[h.epochs.length - 1]);
    let top = 1;
    h.counts.forEach((row, l) => { if (matches[l]) for (const v of row) top = Math.max(top, v); });
    const x = (e) => L + ((e - e0) / (e1 - e0)) * (W - L - R);
    const y = (v) => T + (1 - v / (top * 1.05)) * (H - T - B);
    svg.append(el('line', { x1: L, y1: y(0), x2: W - R, y2: y(0), class: 'axis' }), el('line', { x1: L, y1: y(0), x2: L, y2: T, class: 'axis' }));
    for (const f of [0, 0.5, 1]) svg.append(el('text', { x: L - 6, y: y(top * f) + 4, 'text-anchor': 'end' }, String(Math.round(top * f))));
    svg.append(el('text', { x: L, y: H - B + 16, 'text-anchor': 'middle' }, String(e0)));
    svg.append(el('text', { x: W - R, y: H - B + 16, 'text-anchor': 'middle' }, String(e1)));
    svg.append(el('text', { x: (W + L) / 2, y: H - 4, 'text-anchor': 'middle' }, 'epoch (hover a line for its label)'));
    h.counts.forEach((row, l) => {
      if (!matches[l]) return;
      const line = el('polyline', {
        points: row.map((v, i) => x(h.epochs[i]) + ',' + y(v)).join(' '),
        fill: 'none', stroke: colourOf(l), 'stroke-width': 2, 'stroke-opacity': 0.85,
      });
      const title = data.labels[l] + ': ' + row[row.length - 1] + ' images';
      line.append(el('title', {}, title));
      svg.append(line);
      if (row.length <= 60) {
        row.forEach((v, i) => {
          const dot = el('circle', { cx: x(h.epochs[i]), cy: y(v), r: 3, fill: colourOf(l) });
          dot.append(el('title', {}, data.labels[l] + ', epoch ' + h.epochs[i] + ': ' + v + ' images'));
          svg.append(dot);
        });
      }
    });
  }

  // ---- try a photo ----
  async function classify(file) {
    const answer = $('answer');
    answer.textContent = '';
    const img = document.createElement('img');
    img.src = URL.createObjectURL(file);
    img.alt = file.name;
    const out = document.createElement('div');
    out.textContent = 'Classifying ' + file.name + '\u2026';
    answer.append(img, out);
    if (offline) { out.innerHTML = '<span class="error">Needs the server: open this page from <code>fruits-flow serve</code>.</span>'; return; }
    try {
      const r = await fetch('classify', { method: 'POST', headers: { 'Content-Type': file.type || 'application/octet-stream' }, body: file });
      const j = await r.json().catch(() => ({ error: 'HTTP ' + r.status }));
      if (!r.ok) { out.innerHTML = '<span class="error">' + esc(j.error || ('HTTP ' + r.status)) + '</span>'; return; }
      let html = '';
      // `known: false`: far from every label; the scores then only say which is least far.
      if (j.known === false) {
        html += '<p class="unknown" id="unknown">unknown: not like any label the archive holds' +
          (typeof j.distance === 'number' ? ' (distance ' + j.distance.toFixed(1) + ')' : '') + '</p>';
      } else if (typeof j.answer === 'string') {
        html += '<p>answer: <b>' + esc(j.answer) + '</b></p>';
      }
      html += '<ol class="scores" id="scores">' + (j.labels || []).map((s) =>
        '<li><span class="label">' + esc(s.label) + '</span><span><span class="bar" style="display:block;width:' +
        Math.max(1, s.score * 100).toFixed(1) + '%"></span></span><span>' + pct(s.score) + '</span></li>').join('') + '</ol>';
      html += '<p>nearest cluster: <b>' + (j.cluster === null || j.cluster === undefined ? 'none' : j.cluster) + '</b>' +
        (j.model_epoch !== undefined ? ' &middot; models of epoch ' + j.model_epoch : '') + '</p>';
      out.innerHTML = html;
      window.__map.classified = j;
    } catch (e) {
      out.innerHTML = '<span class="error">' + esc(String(e)) + '</span>';
    }
  }
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) classify(f);
  });
  $('photo').addEventListener('change', (e) => { const f = e.target.files[0]; if (f) classify(f); });

  // ---- controls, summary, data ----
  function note() {
    const wantTsne = st.wanted === 'tsne';
    $('map-note').textContent = wantTsne && !data.tsne ?
      (data.tsne_pending ? 't-SNE is being computed; showing PC1 \u00d7 PC2 meanwhile' : 't-SNE needs at least 10 points; showing PC1 \u00d7 PC2') :
      (projection() === 'tsne' && data.tsne_seconds ? 't-SNE of ' + data.keys.length + ' points in ' + data.tsne_seconds.toFixed(1) + ' s' : '');
  }
  function summary() {
    const s = data.keys.length < data.images ? ' (map: a stable sample of ' + data.keys.length + ')' : '';
    $('summary').innerHTML = 'Epoch ' + data.epoch + ' of <code>' + esc(data.source) + '</code>: ' + data.images +
      ' live images' + s + ', ' + data.labels.length + ' labels, ' + data.errors + ' quarantined. PCA: k = ' + data.k +
      ' of ' + data.dim + ' explain ' + pct(data.explained) + '. KMeans: ' + data.clusters + ' clusters.';
    document.title = 'fruits-flow: epoch ' + data.epoch;
  }
  function refresh() {
    computeFilter();
    note();
    draw();
    legend();
    table();
    history();
  }
  function install(d) {
    const sameSample = data && data.keys.length === d.keys.length && data.keys.every((k, i) => k === d.keys[i]);
    if (!sameSample) { st.pinned = -1; $('pinned').hidden = true; }
    data = d;
    if (st.only >= data.labels.length) st.only = -1;
    summary();
    variance();
    refresh();
    if (d.pngs && !$('pngs').childElementCount) {
      for (const [f, alt] of [['variance.png', 'explained variance'], ['scatter.png', 'PC1 x PC2'], ['labels_over_time.png', 'images per label over time']]) {
        const img = document.createElement('img');
        img.src = f;
        img.alt = alt;
        $('pngs').append(img);
      }
    }
    $('pngs').hidden = !d.pngs;
    window.__map.epoch = d.epoch;
    window.__map.tsne = !!d.tsne;
    window.__map.ready = true;
  }
  $('projection').addEventListener('change', (e) => { st.wanted = e.target.value; st.zoom = 1; st.panX = 0; st.panY = 0; note(); draw(); });
  $('colour').addEventListener('change', (e) => { st.colour = e.target.value; draw(); legend(); });
  $('filter').addEventListener('input', (e) => { st.filter = e.target.value; refresh(); });

  // For tests and the curious: what is on the map, and where a point is on screen.
  window.__map = {
    points: 0, ready: false, tsne: false, epoch: null, hovered: -1,
    screen: (i) => {
      const r = canvas.getBoundingClientRect();
      return screen && screen[i] ? { x: r.left + screen[i][0], y: r.top + screen[i][1] } : null;
    },
    key: (i) => data.keys[i],
    label: (i) => data.labels[data.label[i]],
  };

  // Served: fetch the map, then follow the pipeline (a new epoch, a finished t-SNE).
  async function fetchMap() {
    const r = await fetch('api/map', { cache: 'no-store' });
    const d = await r.json();
    if (d.keys) install(d);
    return d;
  }
  async function follow() {
    try {
      if (!data) {
        await fetchMap();
      } else {
        const s = await (await fetch('status', { cache: 'no-store' })).json();
        $('live').hidden = false;
        if (s.epoch !== data.epoch || data.tsne_pending) await fetchMap();
      }
    } catch (e) {
      $('live').hidden = true;
    }
    setTimeout(follow, data ? 3000 : 1000);
  }
  if (offline) install(window.__DATA);
  else follow();
})();
