// Command launcher runs etcd, kube-apiserver and kube-controller-manager on 127.0.0.1,
// runs one command against them with KUBECONFIG set, and stops everything afterwards.
// It is started by testenv/run, which builds the binaries it expects in -bin.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	serviceCIDR = "10.0.0.0/24"
	serviceIP   = "10.0.0.1"
	// Garbage collection and namespace deletion are what the operator's tests rely on;
	// the service-account controllers make pods and token requests behave as in a
	// real cluster and cost little.
	controllers = "garbage-collector-controller,namespace-controller,serviceaccount-controller," +
		"serviceaccount-token-controller,root-ca-certificate-publisher-controller"
	// With a node, pods run: Deployments, ReplicaSets, EndpointSlices, disruption
	// budgets and the rest behave as on a cluster.
	nodeControllers = "*"
	stopGrace       = 10 * time.Second
	// A command that ignores SIGTERM gets this long before SIGKILL.
	commandGrace = 20 * time.Second
	exitSetup    = 125
)

func main() {
	os.Exit(run())
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "testenv: "+format+"\n", args...)
}

type plane struct {
	dir      string
	bin      string
	versions map[string]string
	pki      *pki
	servers  []*server
	// kubeconfig is the admin one handed to the command.
	kubeconfig string
	// stableKubeconfig, if set, is where the command's kubeconfig is written instead of
	// the run's directory; it is removed when the run ends.
	stableKubeconfig string
	// node is set in node mode (node.go).
	node    *node
	apiPort int
}

func run() int {
	bin := flag.String("bin", "", "directory holding etcd, kube-apiserver, kube-controller-manager and their versions file")
	kubeconfig := flag.String("kubeconfig", "", "where to write the command's admin kubeconfig (default: in the run's directory); removed at exit")
	cgroupRoot := flag.String("node-cgroup-root", "", "node mode: the kubelet's cgroup root, present in every cgroup v1 hierarchy")
	images := flag.String("node-images", "", "node mode: directory holding pause.tar, the sandbox image")
	flag.Parse()
	command := flag.Args()
	if *bin == "" || len(command) == 0 {
		logf("usage: launcher -bin DIR -- COMMAND [ARG...]")
		return exitSetup
	}

	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	startupSignal := make(chan os.Signal, 1)
	watcherDone := make(chan struct{})
	go func() {
		defer close(watcherDone)
		select {
		case s := <-signals:
			startupSignal <- s
			cancel()
		case <-ctx.Done():
		}
	}()

	p := &plane{bin: *bin, stableKubeconfig: *kubeconfig}
	if *cgroupRoot != "" {
		p.node = &node{cgroupRoot: *cgroupRoot, images: *images}
	}
	defer p.removeStableKubeconfig()
	keep := os.Getenv("SCG_TESTENV_KEEP") != ""
	started := time.Now()
	err := p.start(ctx, startTimeout())
	if err != nil {
		p.stop()
		cancel()
		<-watcherDone
		select {
		case s := <-startupSignal:
			p.removeDir()
			return 128 + int(s.(syscall.Signal))
		default:
		}
		logf("control plane failed to start: %v", err)
		p.keepDir()
		return exitSetup
	}
	logf("control plane ready in %.1fs; kubeconfig %s; kubectl %s first on PATH", time.Since(started).Seconds(), p.kubeconfig, p.versions["kubernetes"])

	// From here the signal goroutine above must stop consuming signals: the command
	// stage forwards them instead.
	cancel()
	<-watcherDone
	select {
	case s := <-startupSignal:
		p.stop()
		p.removeDir()
		return 128 + int(s.(syscall.Signal))
	default:
	}
	code := p.runCommand(command, signals)
	p.stop()
	if keep {
		p.keepDir()
	} else {
		p.removeDir()
	}
	return code
}

const (
	dirPrefix = "scg-testenv-"
	// Marks a run's directory as owned by a live launcher; a kept directory has none.
	pidFile = "launcher.pid"
)

func (p *plane) removeStableKubeconfig() {
	if p.stableKubeconfig != "" {
		_ = os.Remove(p.stableKubeconfig)
	}
}

func (p *plane) removeDir() {
	if p.dir == "" {
		return
	}
	if p.node != nil {
		unmountUnder(p.dir)
	}
	if err := os.RemoveAll(p.dir); err != nil {
		logf("could not remove %s: %v", p.dir, err)
	}
}

func (p *plane) keepDir() {
	if p.dir == "" {
		return
	}
	_ = os.Remove(filepath.Join(p.dir, pidFile))
	logf("logs and data kept in %s", p.dir)
}

// removeStaleDirs deletes what launchers that were SIGKILLed left behind: directories
// whose launcher is gone. Their servers died with them (Pdeathsig).
func removeStaleDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, dir := range dirs {
		data, err := os.ReadFile(filepath.Join(dir, pidFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			_ = os.RemoveAll(dir)
		}
	}
}

func startTimeout() time.Duration {
	if s := os.Getenv("SCG_TESTENV_START_TIMEOUT"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return time.Duration(n) * time.Second
		}
	}
	// Generous: a 2-core machine busy with other builds starts kube-apiserver slowly.
	return 180 * time.Second
}

func (p *plane) start(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	if p.node != nil {
		if err := p.node.isolate(); err != nil {
			return err
		}
	}
	removeStaleDirs()
	var err error
	if p.dir, err = os.MkdirTemp("", dirPrefix); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(p.dir, pidFile), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return err
	}
	if p.versions, err = readVersions(filepath.Join(p.bin, "versions")); err != nil {
		return err
	}
	var extraHosts []string
	if p.node != nil {
		extraHosts = append(extraHosts, nodeIP)
	}
	if p.pki, err = newPKI(p.dir, extraHosts...); err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	ports, err := freePorts(4)
	if err != nil {
		return err
	}
	etcdPort, peerPort, apiPort, kcmPort := ports[0], ports[1], ports[2], ports[3]
	p.apiPort = apiPort
	apiURL := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	p.kubeconfig = filepath.Join(p.dir, "admin.kubeconfig")
	if err := writeKubeconfig(p.kubeconfig, apiURL, p.pki.servingCA.certPEM(), "scg-testenv-admin", p.pki.admin); err != nil {
		return err
	}
	if p.stableKubeconfig != "" {
		if err := writeKubeconfig(p.stableKubeconfig, apiURL, p.pki.servingCA.certPEM(), "scg-testenv-admin", p.pki.admin); err != nil {
			return err
		}
		p.kubeconfig = p.stableKubeconfig
	}

	etcdURL, err := p.startEtcd(ctx, etcdPort, peerPort)
	if err != nil {
		return err
	}
	if err := p.startAPIServer(ctx, apiURL, apiPort, etcdURL); err != nil {
		return err
	}
	if err := p.startControllerManager(ctx, apiURL, kcmPort); err != nil {
		return err
	}
	if p.node != nil {
		return p.startNode(ctx, apiURL)
	}
	return nil
}

func (p *plane) startEtcd(ctx context.Context, port, peerPort int) (string, error) {
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", port)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	s, err := startServer("etcd", filepath.Join(p.bin, "etcd"), []string{
		"--name=scg-testenv",
		"--data-dir=" + filepath.Join(p.dir, "etcd"),
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=scg-testenv=" + peerURL,
		// The data lives as long as one command; durability would only cost time.
		"--unsafe-no-fsync=true",
		"--log-level=warn",
	}, filepath.Join(p.dir, "etcd.log"))
	if err != nil {
		return "", err
	}
	p.servers = append(p.servers, s)
	if err := waitHealthy(ctx, s, http.DefaultClient, clientURL+"/health", `"health":"true"`); err != nil {
		return "", err
	}
	logf("etcd %s at %s", p.versions["etcd"], clientURL)
	return clientURL, nil
}

func (p *plane) startAPIServer(ctx context.Context, apiURL string, port int, etcdURL string) error {
	k := p.pki
	where := []string{"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--authorization-mode=RBAC"}
	if p.node != nil {
		var err error
		if where, err = p.nodeAPIServerArgs(); err != nil {
			return err
		}
	}
	s, err := startServer("kube-apiserver", filepath.Join(p.bin, "kube-apiserver"), append(where,
		"--etcd-servers="+etcdURL,
		"--secure-port="+strconv.Itoa(port),
		"--cert-dir="+filepath.Join(p.dir, "apiserver-certs"),
		"--tls-cert-file="+k.servingCert,
		"--tls-private-key-file="+k.servingKey,
		"--client-ca-file="+k.clientCAFile,
		"--service-cluster-ip-range="+serviceCIDR,
		"--service-account-issuer="+apiURL,
		"--service-account-key-file="+k.saPublicKey,
		"--service-account-signing-key-file="+k.saPrivateKey,
		"--allow-privileged=true",
		"--profiling=false",
	), filepath.Join(p.dir, "kube-apiserver.log"))
	if err != nil {
		return err
	}
	p.servers = append(p.servers, s)
	client, err := p.adminHTTPClient()
	if err != nil {
		return err
	}
	if err := waitHealthy(ctx, s, client, apiURL+"/readyz", "ok"); err != nil {
		return err
	}
	logf("kube-apiserver %s at %s", serverVersion(client, apiURL), apiURL)
	return nil
}

func (p *plane) startControllerManager(ctx context.Context, apiURL string, port int) error {
	k := p.pki
	kubeconfig := filepath.Join(p.dir, "kube-controller-manager.kubeconfig")
	if err := writeKubeconfig(kubeconfig, apiURL, k.servingCA.certPEM(), "system:kube-controller-manager", k.kcm); err != nil {
		return err
	}
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + k.servingCert,
		"--tls-private-key-file=" + k.servingKey,
		"--cert-dir=" + filepath.Join(p.dir, "kcm-certs"),
		"--leader-elect=false",
		"--controllers=" + p.controllers(),
		// Signs what asks for it (the csrsigning controller of node mode) with the
		// client CA.
		"--cluster-signing-cert-file=" + k.clientCAFile,
		"--cluster-signing-key-file=" + k.clientCAKey,
		// Each controller acts as its own service account, under the bootstrap RBAC
		// roles, as in a real cluster.
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + k.saPrivateKey,
		"--root-ca-file=" + k.servingCAFile,
		"--profiling=false",
	}
	kcmURL := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := p.startHealthy(ctx, "kube-controller-manager", args, kcmURL+"/healthz"); err != nil {
		return err
	}
	logf("kube-controller-manager %s at %s (controllers: %s)", p.versions["kubernetes"], kcmURL, p.controllers())
	return nil
}

// startHealthy starts the server p.bin/name, logging to p.dir/name.log, and waits until
// its url (on the serving certificate, asked as the admin) answers ok.
func (p *plane) startHealthy(ctx context.Context, name string, args []string, url string) error {
	s, err := startServer(name, filepath.Join(p.bin, name), args, filepath.Join(p.dir, name+".log"))
	if err != nil {
		return err
	}
	p.servers = append(p.servers, s)
	client, err := p.adminHTTPClient()
	if err != nil {
		return err
	}
	return waitHealthy(ctx, s, client, url, "ok")
}

func (p *plane) controllers() string {
	if p.node != nil {
		return nodeControllers
	}
	return controllers
}

// stop takes the servers down in reverse order of start, so the API server never
// outlives etcd by more than its own shutdown.
func (p *plane) stop() {
	for i := len(p.servers) - 1; i >= 0; i-- {
		p.servers[i].stop(stopGrace)
	}
	p.servers = nil
}

func (p *plane) adminHTTPClient() (*http.Client, error) {
	pool := x509.NewCertPool()
	pool.AddCert(p.pki.servingCA.cert)
	cert := tls.Certificate{
		Certificate: [][]byte{p.pki.admin.cert.Raw},
		PrivateKey:  p.pki.admin.key,
	}
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      pool,
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
		}},
	}, nil
}

// waitHealthy polls url until it answers 200 with want in the body, the server exits,
// or ctx ends (the start deadline or a signal).
func waitHealthy(ctx context.Context, s *server, client *http.Client, url, want string) error {
	var last string
	for {
		if s.exited() {
			return fmt.Errorf("%s exited during start (%v); last log lines:\n%s", s.name, s.err, s.logTail(30))
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.Contains(string(body), want) {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, firstLines(string(body), 12))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("%s not ready in time; last answer from %s: %s\nlast log lines:\n%s", s.name, url, last, s.logTail(30))
			}
			return fmt.Errorf("interrupted while waiting for %s", s.name)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append(lines[:n], "...")
	}
	return strings.Join(lines, "\n")
}

// serverVersion reports what the running server says it is, which is what clients see.
func serverVersion(client *http.Client, apiURL string) string {
	resp, err := client.Get(apiURL + "/version")
	if err != nil {
		return "(version unknown: " + err.Error() + ")"
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	const key = `"gitVersion": "`
	if i := strings.Index(string(body), key); i >= 0 {
		rest := string(body[i+len(key):])
		if j := strings.IndexByte(rest, '"'); j >= 0 {
			return rest[:j]
		}
	}
	return "(version unknown)"
}

func readVersions(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("versions file of the build: %w", err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			out[k] = v
		}
	}
	return out, sc.Err()
}

// runCommand runs the user's command in the launcher's own process group, so a
// terminal's Ctrl-C and its stdin reach it as usual; signals sent to the launcher alone
// (kill PID, a CI timeout) are forwarded.
func (p *plane) runCommand(command []string, signals <-chan os.Signal) int {
	cmd := exec.Command(command[0], command[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(),
		"KUBECONFIG="+p.kubeconfig,
		"SCG_E2E_KUBECONFIG="+p.kubeconfig,
		"SCG_TESTENV_DIR="+p.dir,
		// The kubectl of the servers' version, so that no client/server skew warning
		// or difference shows in what the command checks.
		"PATH="+filepath.Join(p.bin, "path")+string(os.PathListSeparator)+os.Getenv("PATH"),
	)
	if p.node != nil {
		cmd.Env = append(cmd.Env, p.node.env(p.apiPort)...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		logf("cannot run %s: %v", command[0], err)
		return 127
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	var killTimer <-chan time.Time
wait:
	for {
		select {
		case err = <-done:
			break wait
		case s := <-signals:
			logf("got %v: passing it to the command, then stopping the control plane", s)
			_ = cmd.Process.Signal(s)
			if killTimer == nil {
				killTimer = time.After(commandGrace)
			}
		case <-killTimer:
			logf("command still running %v after the signal: killing it", commandGrace)
			_ = cmd.Process.Kill()
		}
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return exit.ExitCode()
	}
	if err != nil {
		logf("command failed: %v", err)
		return 1
	}
	return 0
}
