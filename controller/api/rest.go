package api

import (
	"fmt"
	"net/http"
	"strings"

	"connectrpc.com/vanguard"
	"google.golang.org/genproto/googleapis/api/annotations"
)

// restRead are the plain REST paths of the read side: GET only, each one
// transcoded (connectrpc.com/vanguard) to the Connect method it names, so
// it runs through the same handler and interceptors (tracing, metrics,
// error mapping, authentication and roles) as a Connect, gRPC or gRPC-Web
// call. Query parameters fill the request's fields by their JSON or proto
// names (?page_size=10&state=VOLUME_STATE_READY); the reply is the
// method's response message as JSON. Writes stay RPCs: their safety
// (idempotency keys, dry runs) is the API's, not a URL's.
var restRead = []struct{ path, method string }{
	{"/v1/stores", "stowage.v1.StoreService.ListStores"},
	{"/v1/stores/{id}", "stowage.v1.StoreService.GetStore"},
	{"/v1/hosts", "stowage.v1.HostService.ListHosts"},
	{"/v1/hosts/{id}", "stowage.v1.HostService.GetHost"},
	{"/v1/templates", "stowage.v1.ImageService.ListTemplates"},
	{"/v1/templates/{id}", "stowage.v1.ImageService.GetTemplate"},
	{"/v1/volumes", "stowage.v1.VolumeService.ListVolumes"},
	{"/v1/volumes/{id}", "stowage.v1.VolumeService.GetVolume"},
	{"/v1/snapshots", "stowage.v1.SnapshotService.ListSnapshots"},
	{"/v1/snapshots/{id}", "stowage.v1.SnapshotService.GetSnapshot"},
	{"/v1/jobs", "stowage.v1.JobService.ListJobs"},
	{"/v1/jobs/{id}", "stowage.v1.JobService.GetJob"},
}

// RESTPrefix is where the REST paths live.
const RESTPrefix = "/v1/"

// restHandler transcodes restRead onto the Connect handlers of the
// services it is given (path -> handler, as the generated constructors
// return them). A path of a service not served (a controller without
// images) is left out.
func restHandler(served map[string]http.Handler) (http.Handler, error) {
	var rules []*annotations.HttpRule
	var services []*vanguard.Service
	for path, h := range served {
		services = append(services, vanguard.NewService(path, h))
	}
	for _, r := range restRead {
		svc := r.method[:strings.LastIndex(r.method, ".")]
		if _, ok := served["/"+svc+"/"]; !ok {
			continue
		}
		rules = append(rules, &annotations.HttpRule{Selector: r.method, Pattern: &annotations.HttpRule_Get{Get: r.path}})
	}
	t, err := vanguard.NewTranscoder(services, vanguard.WithRules(rules...),
		vanguard.WithUnknownHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprintf(w, `{"code":"not_found","message":"no REST path %s %s (the read paths are GET /v1/{stores,hosts,templates,volumes,snapshots,jobs}[/ID])"}`+"\n",
				r.Method, strings.ReplaceAll(r.URL.Path, `"`, ""))
		})))
	if err != nil {
		return nil, fmt.Errorf("REST transcoder: %w", err)
	}
	return t, nil
}
