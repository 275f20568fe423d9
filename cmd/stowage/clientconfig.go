package main

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/stowage/stowage/datapath/durable"
	"github.com/stowage/stowage/errdefs"
	"github.com/stowage/stowage/failover"
	"github.com/stowage/stowage/trust"
)

// clientConfig is what the CLI needs to reach a controller: its URL, the
// CA its certificate chains to, and an API token. `stowage dev` writes one
// for its user (mode 0600); the controller writes DATA/admin.json with its
// bootstrap admin token on its first start.
type clientConfig struct {
	Server string `json:"server,omitempty"`
	CAPEM  string `json:"ca_pem,omitempty"`
	Token  string `json:"token,omitempty"`
}

// defaultServer is the controller URL when nothing else names one.
const defaultServer = "https://127.0.0.1:8470"

// defaultConfigPath is $STOWAGE_CONFIG, else $XDG_CONFIG_HOME/stowage/config.json
// (~/.config/stowage/config.json).
func defaultConfigPath() string {
	if p := os.Getenv("STOWAGE_CONFIG"); p != "" {
		return p
	}
	dir, err := os.UserConfigDir()
	if err != nil {
		return ""
	}
	return filepath.Join(dir, "stowage", "config.json")
}

// readClientConfig reads path; a missing file is an empty configuration.
func readClientConfig(path string) (clientConfig, error) {
	var c clientConfig
	if path == "" {
		return c, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("client configuration: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("client configuration %s: %v: %w", path, err, errdefs.ErrInvalid)
	}
	return c, nil
}

// writeClientConfig writes c to path, 0600, replacing it atomically.
func writeClientConfig(path string, c clientConfig) error {
	if err := durable.WriteJSON(path, c); err != nil {
		return fmt.Errorf("client configuration: %w", err)
	}
	return nil
}

// clientFlags are the CLI's connection flags, shared by every command.
func clientFlags(root *cobra.Command) {
	f := root.PersistentFlags()
	f.String("server", "", "controller URL, or several comma-separated (controllers sharing etcd metadata) (env STOWAGE_SERVER; default: the client configuration's, else "+defaultServer+")")
	f.String("config", "", "client configuration file (env STOWAGE_CONFIG; default ~/.config/stowage/config.json, written by stowage dev)")
	f.String("ca-file", "", "CA certificate the controller's certificate chains to (env STOWAGE_CA_FILE; default: the client configuration's; the controller's is DATA/pki/ca.crt)")
}

// connection is how one command reaches the controller.
type connection struct {
	url    string // the first controller
	all    string // every controller, comma-separated
	client *http.Client
	config clientConfig
}

// connect resolves the server URL, the CA and the client configuration.
func connectionOf(cmd *cobra.Command) (*connection, error) {
	path, _ := cmd.Flags().GetString("config")
	if path == "" {
		path = defaultConfigPath()
	}
	cfg, err := readClientConfig(path)
	if err != nil {
		return nil, err
	}
	server, _ := cmd.Flags().GetString("server")
	for _, s := range []string{os.Getenv("STOWAGE_SERVER"), cfg.Server, defaultServer} {
		if server == "" {
			server = s
		}
	}
	servers := failover.Split(server)
	for _, s := range servers {
		if !strings.HasPrefix(s, "http://") && !strings.HasPrefix(s, "https://") {
			return nil, usageError{fmt.Errorf("--server %q: want an https:// URL (or several, comma-separated), e.g. %s: %w", server, defaultServer, errdefs.ErrInvalid)}
		}
	}
	caFile, _ := cmd.Flags().GetString("ca-file")
	if caFile == "" {
		caFile = os.Getenv("STOWAGE_CA_FILE")
	}
	caPEM := []byte(cfg.CAPEM)
	if caFile != "" {
		if caPEM, err = os.ReadFile(caFile); err != nil {
			return nil, fmt.Errorf("--ca-file: %w", err)
		}
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(caPEM) > 0 {
		ca, err := trust.ParseCertificate(caPEM)
		if err != nil {
			return nil, fmt.Errorf("the controller's CA: %w", err)
		}
		pool := trust.Pool(ca)
		// The controller is known by its identity in its certificate, at
		// whatever address it is reached.
		tlsCfg = trust.ClientConfig(nil, pool, trust.Is(trust.Controller))
	}
	// Several controllers: requests go to the one that leads (package
	// failover); reads are served by any.
	tr, err := failover.New(&http.Transport{TLSClientConfig: tlsCfg, ForceAttemptHTTP2: true}, servers)
	if err != nil {
		return nil, usageError{fmt.Errorf("--server: %w: %w", err, errdefs.ErrInvalid)}
	}
	return &connection{
		url:    tr.BaseURL(),
		all:    strings.Join(servers, ","),
		config: cfg,
		client: &http.Client{Timeout: 5 * time.Minute, Transport: tr},
	}, nil
}
