// alignsearch web page: text, image and text+image search over the JSON API. No build step.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get("token");
  const withToken = (url) => (token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url);
  let queryImage = null; // a File or Blob, or null

  const status = (text) => { $("status").textContent = text; };

  async function search(params) {
    const started = performance.now();
    status("Searching…");
    let response;
    if (params.image) {
      const form = new FormData();
      form.append("image", params.image, "query");
      for (const [key, value] of Object.entries(params)) if (key !== "image" && value !== "") form.append(key, value);
      response = await fetch(withToken("/api/search"), { method: "POST", body: form });
    } else {
      const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== ""));
      response = await fetch(withToken("/api/search?" + qs));
    }
    const body = await response.json();
    if (!response.ok) { status("Error: " + body.error); return; }
    render(body.results);
    status(`${body.results.length} results in ${Math.round(performance.now() - started)} ms`);
  }

  function render(results) {
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
      img.src = withToken(`/api/image/${hit.id}?size=256`);
      img.alt = hit.relpath;
      img.width = 256; img.height = 256;
      img.addEventListener("click", () => open(hit));
      const meta = document.createElement("figcaption");
      meta.className = "meta";
      const path = document.createElement("span");
      path.className = "path"; path.title = hit.path; path.textContent = hit.relpath;
      const score = document.createElement("span");
      score.className = "score"; score.textContent = hit.score.toFixed(3);
      const similar = document.createElement("button");
      similar.type = "button"; similar.className = "similar"; similar.textContent = "similar";
      similar.title = "Find images like this one";
      similar.addEventListener("click", () => { $("q").value = ""; search({ similar: hit.id, k: $("k").value }); });
      meta.append(path, score, similar);
      card.append(img, meta);
      card.addEventListener("keydown", (e) => {
        if (e.key === "Enter") open(hit);
        if (e.key === "s") similar.click();
      });
      fragment.append(card);
      if (i === 0) card.id = "first-result";
    });
    grid.replaceChildren(fragment);
  }

  function open(hit) {
    $("viewer-img").src = withToken(`/api/image/${hit.id}`);
    $("viewer-caption").textContent = `${hit.path} · ${hit.width}×${hit.height} · score ${hit.score.toFixed(4)}`;
    $("viewer").showModal();
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
    const params = { q, k: $("k").value, text_weight: $("weight").value };
    if (queryImage) params.image = queryImage;
    const url = new URL(location.href);
    url.searchParams.set("q", q);
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
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) $("viewer").close(); });

  const initial = new URLSearchParams(location.search).get("q");
  if (initial) { $("q").value = initial; $("search").requestSubmit(); }
})();
