// alignsearch web page: text, image and text+image search over the JSON API. No build step.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  // The API takes the token from the HttpOnly cookie set when the page was opened from the URL `serve` printed.
  let queryImage = null; // a File or Blob, or null
  let browsed = 0; // images shown in the landing view so far
  let current = 0; // the latest search or landing view: an older answer arriving late is dropped

  const status = (text) => { $("status").textContent = text; };

  const FORM_FIELDS = new Set(["q", "k", "text_weight", "image_weight", "negative_weight", "negative", "tag"]);

  /** The filter bar's values by the API's names (empty ones left out by search()). */
  function filters() {
    const out = { after: $("after").value, before: $("before").value, camera: $("camera").value.trim(),
                  path: $("folder").value.trim(), near: $("near").value.trim().replace(/\s+/g, "") };
    if ($("sort").value !== "score") out.sort = $("sort").value;
    if ($("mode").value !== "auto") out.mode = $("mode").value;
    return out;
  }

  async function search(params) {
    const mine = ++current;
    const started = performance.now();
    status("Searching…");
    let response;
    if (params.image) {
      // The form carries the query; filters, sort and mode go in the URL, as the API documents.
      const form = new FormData();
      const qs = new URLSearchParams();
      form.append("image", params.image, "query");
      for (const [key, value] of Object.entries(params)) {
        if (key === "image" || value === "") continue;
        if (FORM_FIELDS.has(key)) form.append(key, value); else qs.append(key, value);
      }
      response = await fetch("/api/search?" + qs, { method: "POST", body: form });
    } else {
      const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== ""));
      response = await fetch("/api/search?" + qs);
    }
    const body = await response.json();
    if (mine !== current) return;
    if (!response.ok) { status(problem(response, body)); return; }
    $("landing").hidden = true;
    $("more").hidden = true;
    render(body.results);
    status(`${body.results.length} results in ${Math.round(performance.now() - started)} ms`);
  }

  function problem(response, body) {
    if (response.status === 401) return "Not signed in: open the URL that `alignsearch serve` printed (it carries the token).";
    return "Error: " + (body.error || response.statusText);
  }

  // The landing view: what is indexed (counts, roots) and the most recent images, page by page.
  async function landing() {
    const mine = ++current;
    const response = await fetch("/api/info");
    const info = await response.json();
    if (mine !== current) return;
    if (!response.ok) { status(problem(response, info)); return; }
    $("counts").textContent = `${info.images} images indexed` + (info.failed ? `, ${info.failed} could not be read` : "") +
      ` · ${info.model}`;
    $("roots").replaceChildren(...info.roots.map((root) => { const li = document.createElement("li"); li.textContent = root; return li; }));
    $("landing").hidden = false;
    browsed = 0;
    $("grid").replaceChildren();
    await browse();
  }

  async function browse() {
    const mine = current;
    const response = await fetch(`/api/recent?offset=${browsed}&limit=60`);
    const body = await response.json();
    if (mine !== current) return;
    if (!response.ok) { status(problem(response, body)); return; }
    render(body.results, { append: true, pick: true });
    browsed += body.results.length;
    $("more").hidden = browsed >= body.total;
    status(`Showing the ${browsed} most recently indexed of ${body.total} pictures (photos and video moments): pick one to find similar images.`);
  }

  function similarTo(hit) {
    $("q").value = "";
    search({ similar: hit.id, k: $("k").value, tag: $("tag").value.trim(), ...filters(), mode: "" });
  }

  // A thumbnail the server was too busy to draw (503: its decode slots stayed full for a few seconds) is asked for
  // again after its Retry-After, a few times; an <img> cannot see the status, so the retries use fetch.
  const BUSY_RETRIES = 4;
  const pause = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

  async function retryWhenBusy(event) {
    const img = event.target, url = img.src;
    if (url.startsWith("blob:")) return;
    let wait = 1; // the first 503's Retry-After is not visible to the <img>: the server sends 1
    for (let i = 0; i < BUSY_RETRIES; i++) {
      await pause(wait);
      if (img.src !== url) return; // the viewer moved on to another image
      let response;
      try { response = await fetch(url); } catch { return; }
      if (response.ok) {
        const blob = URL.createObjectURL(await response.blob());
        if (img.src !== url) { URL.revokeObjectURL(blob); return; }
        img.addEventListener("load", () => URL.revokeObjectURL(blob), { once: true });
        img.src = blob;
        return;
      }
      if (response.status !== 503) { // gone or refused: its fallback (a moment's thumbnail the card loaded), if any
        const fallback = img.dataset.fallback;
        if (fallback && fallback !== url) img.src = fallback;
        return;
      }
      wait = Math.min(Number(response.headers.get("Retry-After")) || 1, 30);
    }
  }

  function render(results, { append = false, pick = false } = {}) {
    const grid = $("grid");
    const fragment = document.createDocumentFragment();
    results.forEach((hit, i) => {
      const card = document.createElement("figure");
      card.className = "card";
      card.tabIndex = 0;
      card.dataset.id = hit.id;
      const img = document.createElement("img");
      img.loading = "lazy"; // a thousand results load only what is on screen
      img.decoding = "async";
      img.addEventListener("error", retryWhenBusy, { once: true });
      img.src = `/api/image/${hit.id}?size=256`;
      img.alt = hit.relpath;
      img.width = 256; img.height = 256;
      img.addEventListener("click", () => (pick ? similarTo(hit) : open(hit)));
      if (pick) img.title = "Find images like this one";
      const meta = document.createElement("figcaption");
      meta.className = "meta";
      const path = document.createElement("span");
      path.className = "path"; path.textContent = hit.relpath;
      path.title = [hit.path, hit.taken && `taken ${hit.taken.slice(0, 10)}`, hit.camera, hit.caption,
                    hit.tags && hit.tags.length && `tags: ${hit.tags.join(", ")}`,
                    hit.ocr && `text: ${hit.ocr}`].filter(Boolean).join("\n");
      const score = document.createElement("span");
      score.className = "score"; score.textContent = hit.score == null ? "" : hit.score.toFixed(3);
      const similar = document.createElement("button");
      similar.type = "button"; similar.className = "similar"; similar.textContent = "similar";
      similar.title = "Find images like this one";
      similar.addEventListener("click", () => similarTo(hit));
      meta.append(path);
      if (hit.t != null) { // a video moment's time: its own span, so a long name is shortened and never the time
        const at = document.createElement("span");
        at.className = "at"; at.textContent = `@ ${clock(hit.t)}`;
        meta.append(at);
      }
      meta.append(score, similar);
      if (hit.ocr) { // the text read in the image (index --ocr), on one line under the name
        const text = document.createElement("span");
        text.className = "ocr"; text.textContent = hit.ocr.replace(/\s+/g, " "); text.title = hit.ocr;
        meta.append(text);
      }
      card.append(img, meta);
      card.addEventListener("keydown", (e) => {
        if (e.key === "Enter") open(hit);
        if (e.key === "s") similar.click();
      });
      fragment.append(card);
      if (i === 0 && !append) card.id = "first-result";
    });
    if (append) grid.append(fragment); else grid.replaceChildren(fragment);
  }

  /** A video moment's start as 1:23:45 (0:42 under an hour), as the command line prints it. */
  function clock(seconds) {
    const s = Math.floor(seconds), h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, pad = (n) => String(n).padStart(2, "0");
    return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
  }

  let viewing = null; // the hit the viewer shows: a late error of a video no longer shown is ignored

  function open(hit) {
    const video = $("viewer-video");
    viewing = hit;
    video.pause();
    $("viewer-note").hidden = true;
    delete $("viewer-img").dataset.fallback;
    if (hit.t != null) { // a video moment: play its file from t (the server answers range requests)
      $("viewer-img").hidden = true;
      $("viewer-img").removeAttribute("src");
      video.hidden = false;
      video.src = `/api/video/${hit.id}#t=${hit.t}`;
      video.addEventListener("loadedmetadata", () => { video.currentTime = hit.t; video.play().catch(() => {}); },
                             { once: true });
      $("viewer-caption").textContent = `${hit.path} @ ${clock(hit.t)}–${clock(hit.t_end)}`;
      $("viewer").showModal();
      return;
    }
    video.removeAttribute("src");
    video.hidden = true;
    $("viewer-img").hidden = false;
    $("viewer-img").src = `/api/image/${hit.id}`;
    const score = hit.score == null ? "" : ` · score ${hit.score.toFixed(4)}`;
    $("viewer-caption").textContent = `${hit.path} · ${hit.width}×${hit.height}${score}` +
      (hit.ocr ? ` · text: ${hit.ocr.replace(/\s+/g, " ")}` : "");
    $("viewer").showModal();
  }

  // A moment's video the browser cannot play shows the moment's picture instead, with a note: the server answers
  // 404 for a file whose content is no video container (a JPEG named .mp4), 409 for one changed since it was
  // indexed, and a codec the browser has no decoder for (MPEG-4 Part 2) fails to decode; each is an error event on
  // the <video> (which cannot see the status), and it left an empty player. The picture is the moment's still
  // (/api/image); where that is refused too, the thumbnail its card already loaded (kept by the browser's cache).
  function stillInstead() {
    const hit = viewing, video = $("viewer-video");
    if (!hit || hit.t == null || video.hidden) return;
    video.removeAttribute("src");
    video.load(); // drops the failed source: nothing more is fetched for it
    video.hidden = true;
    const img = $("viewer-img");
    img.dataset.fallback = `/api/image/${hit.id}?size=256`;
    img.src = `/api/image/${hit.id}`;
    img.hidden = false;
    const note = $("viewer-note");
    note.textContent = `This video cannot be played here: its picture at ${clock(hit.t)} is shown instead.`;
    note.hidden = false;
  }

  function setImage(file) {
    queryImage = file;
    const label = $("drop-label");
    label.replaceChildren();
    if (file) {
      const thumb = document.createElement("img");
      thumb.src = URL.createObjectURL(file);
      thumb.alt = "query image";
      label.append(thumb, " " + (file.name || "image"));
    } else {
      label.textContent = "+ image";
    }
    $("clear-image").hidden = !file;
  }

  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("q").value.trim();
    if (!q && !queryImage) { status("Type a text, add an image, or both."); return; }
    const params = { q, k: $("k").value, text_weight: $("weight").value, negative: $("negative").value.trim(),
                     tag: $("tag").value.trim(), ...filters() };
    if (queryImage) params.image = queryImage;
    const url = new URL(location.href);
    url.searchParams.set("q", q);
    url.searchParams.delete("token");
    history.replaceState(null, "", url);
    search(params);
  });
  $("weight").addEventListener("input", () => { $("weight-value").textContent = $("weight").value; });
  $("file").addEventListener("change", () => setImage($("file").files[0] || null));
  $("clear-image").addEventListener("click", () => setImage(null));
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  ["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => document.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  document.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) setImage(f); });
  document.addEventListener("paste", (e) => { const f = [...e.clipboardData.files][0]; if (f) setImage(f); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== $("q")) { e.preventDefault(); $("q").focus(); }
  });
  $("viewer-img").addEventListener("error", retryWhenBusy); // a format drawn as JPEG (HEIC, TIFF) can be busy too
  $("viewer-video").addEventListener("error", stillInstead);
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("close", () => $("viewer-video").pause());
  $("more").addEventListener("click", () => browse());
  $("home").addEventListener("click", (e) => { e.preventDefault(); history.replaceState(null, "", "/"); landing(); });
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) $("viewer").close(); });

  const initial = new URLSearchParams(location.search).get("q");
  if (initial) { $("q").value = initial; $("search").requestSubmit(); } else { landing(); }
})();
