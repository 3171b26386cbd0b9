// Lookalike's search page: plain JavaScript, no build step, no external resources.
// Everything goes through this backend's own JSON API; Label Studio's key never reaches here.
"use strict";

(function () {
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const els = {
    project: $("project"), projectLink: $("project-link"), model: $("model"),
    form: $("search-form"), text: $("text"), taskId: $("task-id"), searchTask: $("search-task"),
    file: $("image-file"), paste: $("paste-zone"), k: $("k"),
    query: $("query"), results: $("results"), selectAll: $("select-all"),
    tabTitle: $("tab-title"), queue: $("queue"), message: $("message"),
    suggestLabel: $("suggest-label"), duplicates: $("duplicates"), coverage: $("coverage"),
    progress: $("progress"), jobs: $("jobs"),
    user: $("user"), signOut: $("sign-out"), signIn: $("sign-in"), token: $("token"),
    signInMessage: $("sign-in-message"),
  };
  const state = {
    projects: [], labelStudioUrl: "", project: null, kInitialised: false,
    query: null, results: [], selected: new Set(), searchSeq: 0,
  };

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function api(method, path, body) {
    const options = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    let data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (response.status === 401 && path !== "/api/session") showSignIn(true);
    if (!response.ok) {
      throw new Error((data && data.error) || `${method} ${path}: HTTP ${response.status}`);
    }
    return data;
  }

  // ---------------------------------------------------------------- signing in
  // The token goes to this backend once; it answers with an HttpOnly session cookie.
  function showSignIn(show) {
    els.signIn.hidden = !show;
    document.querySelector("main.layout").hidden = show;
  }

  async function checkSession() {
    try {
      const data = await api("GET", "/api/session");
      els.user.textContent = data.user ? data.user.email : "";
      els.signOut.hidden = !data.user;
      showSignIn(false);
      return true;
    } catch (error) {
      showSignIn(true);
      return false;
    }
  }

  els.signIn.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "/api/session", { token: els.token.value.trim() });
      els.token.value = "";
      els.signInMessage.textContent = "";
      if (await checkSession()) poll();
    } catch (error) {
      els.signInMessage.textContent = error.message;
      els.signInMessage.className = "message error";
    }
  });
  els.signOut.addEventListener("click", async () => {
    await api("DELETE", "/api/session");
    window.location.reload();
  });

  function say(text, kind) {
    els.message.textContent = text || "";
    els.message.className = "message" + (kind ? " " + kind : "");
  }

  const thumbUrl = (project, task, size) =>
    `/api/projects/${project}/tasks/${task}/thumbnail?size=${size || 256}`;
  const taskUrl = (project, task) => `${state.labelStudioUrl}/projects/${project}/data?task=${task}`;

  // ---------------------------------------------------------------- projects & progress
  function renderProjectPicker() {
    const current = state.project;
    const options = state.projects.map((p) => el("option", {
      value: p.id,
      text: `${p.title} (#${p.id})` + (p.connected ? "" : " — not indexed by this backend"),
    }));
    els.project.replaceChildren(...options);
    if (current !== null && state.projects.some((p) => p.id === current)) {
      els.project.value = String(current);
    } else if (state.projects.length) {
      selectProject(state.projects[0].id);
    }
  }

  function selectProject(id) {
    state.project = id;
    els.project.value = String(id);
    const project = state.projects.find((p) => p.id === id);
    els.projectLink.href = project ? project.url : "#";
    clearResults();
    renderProgress();
    refreshCoverage();
  }

  // ---------------------------------------------------------------- coverage mode
  async function refreshCoverage() {
    if (!state.project) return;
    try {
      const data = await api("GET", `/api/projects/${state.project}/coverage`);
      els.coverage.checked = data.enabled;
      els.coverage.disabled = false;
    } catch (error) {
      els.coverage.disabled = true;  // a project Lookalike does not know yet
    }
  }

  async function setCoverage() {
    try {
      const data = await api("PUT", `/api/projects/${state.project}/coverage`,
                             { enabled: els.coverage.checked });
      say(data.enabled ? "Coverage order on: Label All Tasks visits every cluster first " +
                         "(applied by the workers in a moment)." : "Coverage order off.");
    } catch (error) {
      say(error.message, "error");
      refreshCoverage();
    }
  }

  function renderProgress() {
    const connected = state.projects.filter((p) => p.connected);
    if (!connected.length) {
      els.progress.replaceChildren(el("div", { class: "muted",
        text: "No project is indexed by this backend yet: connect it to a project in " +
              "Label Studio (Settings › Model)." }));
      return;
    }
    els.progress.replaceChildren(...connected.map((p) => {
      const s = p.status;
      // indexed and pending are null while the vector database is unreachable (s.error says so).
      const indexed = s.indexed ?? "?", pending = s.pending ?? "?";
      const done = (s.indexed ?? 0) + s.failed;
      const percent = s.total ? Math.round((100 * (s.indexed ?? 0)) / s.total) : 0;
      const failures = s.failures_total ? el("details", { class: "failures" },
        el("summary", { text: `${s.failures_total} failure${s.failures_total > 1 ? "s" : ""}` }),
        el("ul", {}, s.failures.map((f) => el("li", {},
          el("a", { href: taskUrl(p.id, f.task_id), target: "_blank", rel: "noopener",
                    text: `#${f.task_id}` }),
          `: ${f.reason}` + (f.final ? "" : ` (retrying, attempt ${f.attempts})`)))),
        s.failures_total > s.failures.length
          ? el("div", { class: "muted", text: `… and ${s.failures_total - s.failures.length} more` })
          : null) : null;
      return el("div", { class: "project" + (p.id === state.project ? " current" : ""),
                         "data-project": p.id },
        el("div", { class: "name" }, el("span", { text: p.title }),
           el("span", { class: "muted indexed-count", text: `${indexed} / ${s.total}` })),
        el("div", { class: "bar" + (s.total && done >= s.total ? " done" : "") },
           el("span", { style: `width: ${percent}%` })),
        el("div", { class: "counts" },
           el("span", { class: "indexed", text: `indexed ${indexed}` }),
           el("span", { class: "total", text: `total ${s.total}` }),
           el("span", { class: "pending", text: `pending ${pending}` }),
           s.retrying ? el("span", { text: `retrying ${s.retrying}` }) : null,
           el("span", { class: "failed" + (s.failed ? " bad" : ""), text: `failed ${s.failed}` }),
           el("span", { text: `labeled ${s.labeled}` })),
        s.error ? el("div", { class: "warning", text: s.error }) : null,
        failures);
    }));
  }

  async function refreshProjects() {
    const data = await api("GET", "/api/projects");
    const firstLoad = !state.projects.length;
    const summary = (projects) => JSON.stringify(projects.map((p) => [p.id, p.title, p.connected]));
    const changed = summary(data.projects) !== summary(state.projects);
    state.projects = data.projects;
    state.labelStudioUrl = data.label_studio_url;
    els.model.textContent = data.model ? `model: ${data.model}` : "";
    // Image-only models cannot search by text: no text box to try it with.
    els.text.closest(".row").hidden = data.text_search === false;
    if (!state.kInitialised && data.similar_k) {
      els.k.value = data.similar_k;
      state.kInitialised = true;
    }
    if (firstLoad || changed) renderProjectPicker();
    renderProgress();
    if (data.error) say(`Label Studio: ${data.error}`, "error");
  }

  async function refreshJobs() {
    const j = await api("GET", "/api/jobs");
    const box = (value, label, cls) => el("div", { class: cls }, el("b", { text: value }),
                                          el("span", { text: label }));
    const parts = [
      el("div", { class: "jobs-summary" },
         box(j.queued, "queued", "queued"), box(j.started, "running", "running"),
         box(j.scheduled, "retry later", "scheduled"), box(j.failed, "failed", "failed"),
         box(j.finished, "finished", "finished"), box(j.workers, "workers", "workers")),
      j.workers ? null : el("div", { class: "warning",
        text: "No worker is running: start `lookalike worker` to index tasks." }),
      ...j.running.map((job) => el("div", { class: "job" },
        el("b", { text: job.function }),
        job.project !== null ? ` project ${job.project}` : "",
        job.tasks !== null ? `, ${job.tasks} tasks` : "",
        Object.keys(job.meta).length
          ? el("div", { class: "muted", text: Object.entries(job.meta)
              .map(([k, v]) => `${k}: ${v}`).join(", ") })
          : null)),
    ];
    els.jobs.replaceChildren(...parts.filter((part) => part));
  }

  let polling = false;
  async function poll() {
    if (!els.signIn.hidden) { polling = false; return; }  // resumes after signing in
    if (polling) return;
    polling = true;
    try {
      await Promise.all([refreshProjects(), refreshJobs()]);
    } catch (error) {
      els.jobs.replaceChildren(el("div", { class: "warning", text: `Backend: ${error.message}` }));
    } finally {
      setTimeout(() => { polling = false; poll(); }, POLL_MS);
    }
  }

  // ---------------------------------------------------------------- searching
  function clearResults() {
    state.results = [];
    state.selected.clear();
    state.query = null;
    els.results.replaceChildren();
    els.query.hidden = true;
    els.tabTitle.value = "";
    updateSelection();
  }

  function renderQuery(query) {
    const parts = [];
    if (query.kind === "task") {
      parts.push(el("img", { src: thumbUrl(state.project, query.taskId, 128), alt: "" }));
    } else if (query.kind === "image") {
      parts.push(el("img", { src: query.preview, alt: "" }));
    }
    parts.push(el("div", {}, el("div", { class: "title", text: query.title }),
      query.kind === "task"
        ? el("a", { href: taskUrl(state.project, query.taskId), target: "_blank",
                    rel: "noopener", text: "open in Label Studio ↗" })
        : null));
    els.query.replaceChildren(...parts);
    els.query.hidden = false;
  }

  async function search(query) {
    if (state.project === null) {
      say("Pick a project first.", "error");
      return;
    }
    const k = parseInt(els.k.value, 10) || 20;
    const seq = ++state.searchSeq;
    state.query = query;
    renderQuery(query);
    say("Searching…", "busy");
    els.results.replaceChildren();
    state.results = [];
    state.selected.clear();
    updateSelection();
    try {
      const data = await api("POST", `/api/projects/${state.project}/similar`,
                             { ...query.body, k });
      if (seq !== state.searchSeq) return; // a newer search has started
      state.results = data.results;
      els.tabTitle.value = query.title;
      renderResults();
      say(data.results.length ? `${data.results.length} similar unlabeled tasks.`
                              : "No unlabeled tasks found.", data.results.length ? "" : "busy");
    } catch (error) {
      if (seq === state.searchSeq) say(error.message, "error");
    }
  }

  // "Not this": the same query again, with this result as a negative example (Rocchio).
  function refine(taskId) {
    const query = state.query;
    if (!query) return;
    const notLike = [...(query.body.not_task_ids || []), taskId];
    search({ ...query, title: query.title.replace(/ \(refined\)$/, "") + " (refined)",
             body: { ...query.body, not_task_ids: notLike } });
  }

  function searchTask(taskId) {
    const id = parseInt(taskId, 10);
    if (!Number.isInteger(id) || id < 1) {
      say("Enter a task id.", "error");
      return;
    }
    els.taskId.value = String(id);
    search({ kind: "task", taskId: id, title: `Similar to #${id}`, body: { task_id: id } });
  }

  function searchText(text) {
    const prompt = text.trim();
    if (!prompt) {
      say("Type what to look for, or give a task id or an image.", "error");
      return;
    }
    search({ kind: "text", title: `Text: ${prompt.slice(0, 60)}`, body: { text: prompt } });
  }

  function searchImageFile(file) {
    if (!file || !file.type.startsWith("image/")) {
      say("That is not an image.", "error");
      return;
    }
    const reader = new FileReader();
    reader.onload = () => search({
      kind: "image", preview: reader.result, title: "Similar to uploaded image",
      body: { image: reader.result },
    });
    reader.onerror = () => say("Could not read that image.", "error");
    reader.readAsDataURL(file);
  }

  // ---------------------------------------------------------------- results & queueing
  function renderResults() {
    if (!state.results.length) {
      els.results.replaceChildren(el("div", { class: "empty", text: "No results." }));
      return;
    }
    const project = state.project;
    els.results.replaceChildren(...state.results.map((r) => {
      const checkbox = el("input", { type: "checkbox", class: "select",
                                     "aria-label": `select task ${r.task_id}` });
      const card = el("div", { class: "result", "data-task-id": r.task_id,
                               "data-score": r.score },
        el("img", { class: "thumb", loading: "lazy", alt: `task ${r.task_id}`,
                    title: "Search for tasks similar to this one",
                    src: thumbUrl(project, r.task_id, 256),
                    onerror: (event) => event.target.classList.add("broken"),
                    onclick: () => searchTask(r.task_id) }),
        el("div", { class: "meta" },
           checkbox,
           el("span", { class: "score", text: r.score.toFixed(3) }),
           el("span", { class: "task", text: `#${r.task_id}` }),
           el("a", { class: "open", href: taskUrl(project, r.task_id), target: "_blank",
                     rel: "noopener", title: "Open in Label Studio", text: "open ↗" }),
           el("button", { class: "not-this", type: "button", text: "not this",
                          title: "Search again, away from tasks like this one",
                          onclick: () => refine(r.task_id) })));
      checkbox.addEventListener("change", () => {
        if (checkbox.checked) state.selected.add(r.task_id);
        else state.selected.delete(r.task_id);
        card.classList.toggle("selected", checkbox.checked);
        updateSelection();
      });
      return card;
    }));
  }

  // ---------------------------------------------------------------- near-duplicates
  async function showDuplicates() {
    const project = state.project;
    if (!project) return;
    const seq = ++state.searchSeq;
    clearResults();
    say("Grouping near-duplicates…");
    let data;
    for (;;) {  // 202 while the first grouping runs in a worker
      const response = await fetch(`/api/projects/${project}/duplicates?page_size=200`,
                                   { credentials: "same-origin" });
      data = await response.json();
      if (seq !== state.searchSeq) return;
      if (!response.ok) { say(data.error || "Could not group near-duplicates.", "error"); return; }
      if (response.status === 200) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    const group = (g) => el("div", { class: "dup-group" },
      el("div", { class: "muted", text: `cosine ${g.max_score.toFixed(3)}` }),
      el("div", { class: "dup-members" }, g.task_ids.map((t) => el("a", {
          class: "dup-member" + (t === g.keep ? " keep" : ""), href: taskUrl(project, t),
          target: "_blank", rel: "noopener",
          title: t === g.keep ? "kept" : "redundant copy (in the Near-duplicates tab)" },
        el("img", { class: "thumb", loading: "lazy", alt: `task ${t}`,
                    src: thumbUrl(project, t, 128) }),
        el("span", { text: `#${t}` + (g.labels[t] ? ` ${g.labels[t].join(", ")}` : "") })))));
    const parts = [];
    if (data.conflicting.length) {
      parts.push(el("h3", { text: `Conflicting labels (${data.conflicting.length})` }),
                 ...data.conflicting.map(group));
    }
    parts.push(el("h3", { text: `${data.total_groups} groups at cosine ≥ ${data.threshold}` +
                                 (data.status === "updating" ? " (updating…)" : "") }),
               ...data.groups.map(group));
    els.results.replaceChildren(el("div", { class: "duplicates" }, ...parts));
    say(`${data.redundant} redundant copies are in the "${data.tab}" tab in Label Studio.`);
  }

  function updateSelection() {
    const n = state.selected.size;
    els.queue.disabled = n === 0;
    els.queue.textContent = n ? `Queue selected (${n})` : "Queue selected";
    els.selectAll.checked = n > 0 && n === state.results.length;
    els.selectAll.indeterminate = n > 0 && n < state.results.length;
  }

  function selectAll(on) {
    for (const card of els.results.querySelectorAll(".result")) {
      const checkbox = card.querySelector("input.select");
      if (checkbox.checked !== on) {
        checkbox.checked = on;
        checkbox.dispatchEvent(new Event("change"));
      }
    }
    updateSelection();
  }

  async function queueSelected() {
    const chosen = state.results.filter((r) => state.selected.has(r.task_id));
    const title = els.tabTitle.value.trim() || (state.query && state.query.title);
    if (!chosen.length || !title) return;
    els.queue.disabled = true;
    say(`Queueing ${chosen.length} tasks…`, "busy");
    try {
      // With a label: the selected tasks open with it pre-selected (Choices configs).
      const suggest = els.suggestLabel.value.trim();
      const data = await api("POST", `/api/projects/${state.project}/queue`, {
        title, results: chosen.map((r) => ({ task_id: r.task_id, score: r.score })),
        ...(suggest ? { suggest } : {}),
      });
      els.message.replaceChildren(data.message + " ",
        el("a", { href: data.url, target: "_blank", rel: "noopener", text: "open the tab ↗" }));
      els.message.className = "message ok";
    } catch (error) {
      say(error.message, "error");
    } finally {
      updateSelection();
    }
  }

  // ---------------------------------------------------------------- wiring
  els.project.addEventListener("change", () => selectProject(parseInt(els.project.value, 10)));
  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (els.text.value.trim()) searchText(els.text.value);
    else if (els.taskId.value) searchTask(els.taskId.value);
    else searchText("");
  });
  els.searchTask.addEventListener("click", () => searchTask(els.taskId.value));
  els.taskId.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      searchTask(els.taskId.value);
    }
  });
  els.file.addEventListener("change", () => {
    if (els.file.files.length) searchImageFile(els.file.files[0]);
    els.file.value = "";
  });
  document.addEventListener("paste", (event) => {
    const items = Array.from((event.clipboardData && event.clipboardData.items) || []);
    const image = items.find((item) => item.kind === "file" && item.type.startsWith("image/"));
    if (image) {
      event.preventDefault();
      searchImageFile(image.getAsFile());
      return;
    }
    // A pasted image URL (outside the text fields) searches by that URL.
    const target = event.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    const text = (event.clipboardData && event.clipboardData.getData("text")) || "";
    if (/^https?:\/\/\S+$/i.test(text.trim())) {
      event.preventDefault();
      const url = text.trim();
      search({ kind: "image", preview: url, title: `Similar to ${url.split("/").pop().slice(0, 40)}`,
               body: { url } });
    }
  });
  for (const name of ["dragenter", "dragover"]) {
    els.paste.addEventListener(name, (event) => {
      event.preventDefault();
      els.paste.classList.add("dragging");
    });
  }
  els.paste.addEventListener("dragleave", () => els.paste.classList.remove("dragging"));
  els.paste.addEventListener("drop", (event) => {
    event.preventDefault();
    els.paste.classList.remove("dragging");
    if (event.dataTransfer.files.length) searchImageFile(event.dataTransfer.files[0]);
  });
  els.selectAll.addEventListener("change", () => selectAll(els.selectAll.checked));
  els.queue.addEventListener("click", queueSelected);
  els.duplicates.addEventListener("click", showDuplicates);
  els.coverage.addEventListener("change", setCoverage);

  updateSelection();
  checkSession().then((signedIn) => { if (signedIn) poll(); });
})();
