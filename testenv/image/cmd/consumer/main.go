// Command consumer is a test workload that calls a URL at a fixed interval with a bearer
// token and counts how the calls fare, to measure what an application sees while its
// token is rotated.
//
// Modes:
//
//	proxy  no Authorization header: a local agent proxy at --url adds it.
//	file   the token is read from --token-file before every call; the file is also
//	       polled every 50 ms so that a change is noticed even between calls.
//	env    the token is read once at start from the variable named by --token-env, as
//	       an application that takes its token from the environment does.
//
// GET /stats on --listen returns the counters as JSON, GET /healthz returns 200. Tokens
// are never printed or served: only the first 16 hex digits of their SHA-256.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const filePoll = 50 * time.Millisecond

type options struct {
	mode      string
	url       string
	tokenFile string
	tokenEnv  string
	interval  time.Duration
	listen    string
	caFile    string
	timeout   time.Duration
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("consumer: ")
	var o options
	flag.StringVar(&o.mode, "mode", "", "proxy, file or env")
	flag.StringVar(&o.url, "url", "", "URL to GET")
	flag.StringVar(&o.tokenFile, "token-file", "", "file mode: file holding the token")
	flag.StringVar(&o.tokenEnv, "token-env", "", "env mode: variable holding the token")
	flag.DurationVar(&o.interval, "interval", 100*time.Millisecond, "time between calls")
	flag.StringVar(&o.listen, "listen", ":9090", "address of the /stats and /healthz server")
	flag.StringVar(&o.caFile, "ca-file", "", "PEM file of extra CA certificates for https URLs")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Second, "timeout of one call")
	flag.Parse()
	if err := run(o); err != nil {
		log.Fatal(err)
	}
}

func run(o options) error {
	if err := validate(o); err != nil {
		return err
	}
	client, err := newClient(o)
	if err != nil {
		return err
	}
	st := newStats(o.mode)
	source, err := newSource(o, st)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	srv := &http.Server{Addr: o.listen, Handler: st.handler(), ReadHeaderTimeout: 5 * time.Second}
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.ListenAndServe() }()

	if o.mode == "file" {
		go pollFile(ctx, o.tokenFile, st)
	}
	log.Printf("mode %s, calling %s every %s, stats on %s", o.mode, o.url, o.interval, o.listen)
	go callLoop(ctx, o, client, source, st)

	select {
	case <-ctx.Done():
	case err := <-srvErr:
		return fmt.Errorf("stats server: %w", err)
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return srv.Shutdown(shutdown)
}

func validate(o options) error {
	if o.url == "" {
		return errors.New("--url is required")
	}
	if o.interval <= 0 || o.timeout <= 0 {
		return errors.New("--interval and --timeout must be positive")
	}
	switch o.mode {
	case "proxy":
	case "file":
		if o.tokenFile == "" {
			return errors.New("--mode file needs --token-file")
		}
	case "env":
		if o.tokenEnv == "" {
			return errors.New("--mode env needs --token-env")
		}
	default:
		return fmt.Errorf("--mode %q: want proxy, file or env", o.mode)
	}
	return nil
}

// newClient returns an HTTP client that trusts the system CAs plus --ca-file, and that
// ignores any HTTP proxy set in the environment: the calls go to --url itself.
func newClient(o options) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil
	if o.caFile != "" {
		pem, err := os.ReadFile(o.caFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-file: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca-file %s: no PEM certificate in it", o.caFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: tr, Timeout: o.timeout}, nil
}

// tokenSource returns the token for the next call; "" with a nil error means no
// Authorization header (proxy mode).
type tokenSource func() (string, error)

func newSource(o options, st *stats) (tokenSource, error) {
	switch o.mode {
	case "file":
		return func() (string, error) {
			tok, err := readToken(o.tokenFile)
			if err == nil {
				st.hold(tok)
			}
			return tok, err
		}, nil
	case "env":
		tok := strings.TrimSpace(os.Getenv(o.tokenEnv))
		if tok == "" {
			return nil, fmt.Errorf("--token-env: $%s is unset or empty", o.tokenEnv)
		}
		st.hold(tok)
		return func() (string, error) { return tok, nil }, nil
	default:
		return func() (string, error) { return "", nil }, nil
	}
}

// readToken reads a token file, as mounted from a Secret: surrounding white space is not
// part of the token.
func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", errors.New("token file unreadable")
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", errors.New("token file empty")
	}
	return tok, nil
}

// pollFile notices a new token in the file between calls.
func pollFile(ctx context.Context, path string, st *stats) {
	t := time.NewTicker(filePoll)
	defer t.Stop()
	for {
		if tok, err := readToken(path); err == nil {
			st.hold(tok)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func callLoop(ctx context.Context, o options, client *http.Client, source tokenSource, st *stats) {
	t := time.NewTicker(o.interval)
	defer t.Stop()
	for {
		call(ctx, o.url, client, source, st)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// call makes one GET and counts its outcome. Failures are logged by status code or
// error class only: the token never reaches the log.
func call(ctx context.Context, url string, client *http.Client, source tokenSource, st *stats) {
	tok, err := source()
	if err != nil {
		st.noToken()
		log.Printf("call not made: %v", err)
		return
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		st.transportError()
		log.Printf("call failed: bad request: %v", err)
		return
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		st.transportError()
		// Without the *url.Error wrapper: the cause alone, not the method and URL again.
		cause := err
		if inner := errors.Unwrap(err); inner != nil {
			cause = inner
		}
		log.Printf("call failed: transport error: %v", cause)
		return
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	st.status(resp.StatusCode)
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		log.Printf("call failed: status %d", resp.StatusCode)
	}
}

type heldToken struct {
	SHA256Prefix string `json:"sha256_16"`
	FirstHeldMs  int64  `json:"first_held_unix_ms"`
}

// stats are the counters served on /stats. Every call counts in exactly one of ok and
// failed; a failed call is further counted by status code, as a transport error (no
// response), or as not made because the token file could not be read.
type stats struct {
	mu              sync.Mutex
	mode            string
	startedMs       int64
	ok              uint64
	failed          uint64
	byStatus        map[int]uint64
	failedTransport uint64
	failedNoToken   uint64
	tokens          []heldToken
	seen            map[string]bool
}

func newStats(mode string) *stats {
	return &stats{
		mode:      mode,
		startedMs: time.Now().UnixMilli(),
		byStatus:  map[int]uint64{},
		seen:      map[string]bool{},
	}
}

// hold records a token as held, with the time it was first seen.
func (s *stats) hold(tok string) {
	sum := sha256.Sum256([]byte(tok))
	prefix := hex.EncodeToString(sum[:])[:16]
	now := time.Now().UnixMilli()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seen[prefix] {
		return
	}
	s.seen[prefix] = true
	s.tokens = append(s.tokens, heldToken{SHA256Prefix: prefix, FirstHeldMs: now})
}

func (s *stats) status(code int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if code >= 200 && code <= 299 {
		s.ok++
		return
	}
	s.failed++
	s.byStatus[code]++
}

func (s *stats) transportError() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failed++
	s.failedTransport++
}

func (s *stats) noToken() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failed++
	s.failedNoToken++
}

type statsJSON struct {
	Mode            string            `json:"mode"`
	OK              uint64            `json:"ok"`
	Failed          uint64            `json:"failed"`
	FailedByStatus  map[string]uint64 `json:"failed_by_status"`
	FailedTransport uint64            `json:"failed_transport"`
	FailedNoToken   uint64            `json:"failed_no_token"`
	Tokens          []heldToken       `json:"tokens"`
	StartedMs       int64             `json:"started_unix_ms"`
}

func (s *stats) snapshot() statsJSON {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := statsJSON{
		Mode:            s.mode,
		OK:              s.ok,
		Failed:          s.failed,
		FailedByStatus:  make(map[string]uint64, len(s.byStatus)),
		FailedTransport: s.failedTransport,
		FailedNoToken:   s.failedNoToken,
		Tokens:          append([]heldToken{}, s.tokens...),
		StartedMs:       s.startedMs,
	}
	for code, n := range s.byStatus {
		out.FailedByStatus[strconv.Itoa(code)] = n
	}
	return out
}

func (s *stats) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(s.snapshot())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	return mux
}
