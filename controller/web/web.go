// Package web is the controller's web dashboard: static files (HTML, CSS,
// vanilla JavaScript, embedded in the binary, no build step) served under
// /ui/ on the API port. The page holds no data of its own: it calls the
// same Connect API as the CLI, with JSON, carrying the API token the user
// pastes (kept in the tab's sessionStorage), so the API's tokens and roles
// apply unchanged. It shows stores, hosts, templates, volumes and jobs,
// follows running jobs live (JobService.WatchJob, the Connect streaming
// protocol over fetch) and shows each job's plan with its reasons. It is
// read-only.
package web

import (
	"embed"
	"io/fs"
	"net/http"
	"strings"
)

// Prefix is where the dashboard is served.
const Prefix = "/ui/"

//go:embed static
var static embed.FS

// csp allows the page's own script, style and API calls only: no inline
// script or style, no other origin, no framing.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
	"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the dashboard under Prefix (and redirects /ui to it).
func Handler() http.Handler {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	files := http.StripPrefix(Prefix, http.FileServer(http.FS(sub)))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		if !strings.HasPrefix(r.URL.Path, Prefix) {
			http.Redirect(w, r, Prefix, http.StatusMovedPermanently)
			return
		}
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		h.Set("Cache-Control", "no-cache") // revalidated: a new binary serves new files at once
		files.ServeHTTP(w, r)
	})
}
