// Package failpoint names the points where Stowage changes durable state,
// so that tests can crash, stall or fail a process exactly there, as etcd's
// robustness tests do. It uses etcd's failpoint runtime
// (go.etcd.io/gofail/runtime) when the binary is built with
// `-tags failpoints`; release builds compile Hit to nothing.
//
// A failpoint is enabled for a process through the environment
// (GOFAIL_FAILPOINTS="agentBeforePublish=return(\"kill\")") or gofail's
// HTTP endpoint (GOFAIL_HTTP=127.0.0.1:port; PUT /<name> with the terms).
// Terms are gofail's: panic, sleep(ms), return("…"), with counts and
// percentages. Two return values mean something here: "kill" sends the
// process SIGKILL at that point (a crash, no deferred cleanup), and
// "error" makes the step fail with an unavailable error.
package failpoint
