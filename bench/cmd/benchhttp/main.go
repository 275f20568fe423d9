// Command benchhttp serves a directory over plain HTTP on loopback for the
// FUSE benchmark (bench/fuse.sh): net/http's file server, which answers
// Range requests, sends Content-Length and Last-Modified, and writes file
// bodies with sendfile. Both curl (the peer) and the template mount read
// from it, so they are measured against the same server.
//
//	benchhttp -root DIR [-addr 127.0.0.1:0]
//
// It prints "LISTEN http://ADDR/" on stdout once it accepts connections and
// serves until SIGTERM or SIGINT.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	root := flag.String("root", "", "directory to serve (required)")
	addr := flag.String("addr", "127.0.0.1:0", "listen address (loopback only)")
	flag.Parse()
	if *root == "" {
		fmt.Fprintln(os.Stderr, "benchhttp: -root is required")
		os.Exit(2)
	}
	host, _, err := net.SplitHostPort(*addr)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		fmt.Fprintf(os.Stderr, "benchhttp: -addr %q: want a loopback address\n", *addr)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		slog.Error("benchhttp: listen", "err", err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(*root)), ReadHeaderTimeout: 10 * time.Second}
	fmt.Printf("LISTEN http://%s/\n", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err = srv.Shutdown(sctx)
	case err = <-errc:
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		slog.Error("benchhttp: serve", "err", err)
		os.Exit(1)
	}
}
