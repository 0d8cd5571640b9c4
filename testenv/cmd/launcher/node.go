package main

// The node of `testenv/run --node`: containerd, a kubelet, kube-scheduler and kube-proxy
// next to the control plane, so that pods really run (under runc, cgroup v1).
//
// testenv/run starts the launcher inside new PID, mount and network namespaces
// (unshare), so that everything here is private to the run:
//   - network: only `lo` and one end of a veth pair holding the node's address (its
//     peer stays down), with a blackhole default route. Pods sit on a bridge (cni0) in this namespace. No
//     interface leads out of it, so no packet of a pod or of the command can leave the
//     machine, whatever address it is sent to;
//   - mounts: tmpfs over the paths containerd, the CNI plugins and the kubelet write to
//     outside their configured roots; they vanish with the namespace;
//   - processes: the launcher is PID 1, so when it exits the kernel kills everything
//     left, containerd's shims and the containers included.
// The cgroups the kubelet creates live under a root that testenv/run creates before
// and removes after the run.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	nodeName = "scg-node"
	// The node's address, on a veth with no carrier inside the run's network namespace. The
	// API server advertises it (the `kubernetes` Service points at it) and its serving
	// certificate names it; the SCG simulator of the node tests listens on it too.
	nodeIP     = "10.200.0.1"
	nodePrefix = "/24"
	podCIDR    = "10.88.0.0/16"
	// The sandbox image: imported from the run's image directory, never pulled.
	pauseImage = "registry.k8s.io/pause:3.10"
)

// node is what node mode adds to the plane.
type node struct {
	// cgroupRoot exists in every cgroup v1 hierarchy (testenv/run made it).
	cgroupRoot string
	// images holds pause.tar, imported into containerd before the kubelet starts.
	images     string
	dir        string
	containerd string // its socket
	auditLog   string
}

// nodePaths are the fixed paths containerd, the CNI plugins and the kubelet use whatever
// their configuration says; each gets a tmpfs of the run's own.
var nodePaths = []string{
	"/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/log/pods",
	"/var/lib/kubelet", "/run/netns",
}

// isolate checks that the launcher runs in namespaces of its own, then lays out the
// network and the private mounts.
func (n *node) isolate() error {
	if os.Getpid() != 1 {
		return fmt.Errorf("node mode must run as PID 1 of its own namespaces (testenv/run --node starts it under unshare)")
	}
	steps := [][]string{
		{"ip", "link", "set", "lo", "up"},
		// A veth pair whose peer stays down: the node's address is on an interface
		// with no carrier, so nothing sent to it can leave.
		{"ip", "link", "add", "scg-node", "type", "veth", "peer", "name", "scg-nowhere"},
		{"ip", "addr", "add", nodeIP + nodePrefix, "dev", "scg-node"},
		{"ip", "link", "set", "scg-node", "up"},
		// Anything not on lo, the node's /24 or the pod bridge is dropped here.
		{"ip", "route", "add", "blackhole", "default"},
		{"sysctl", "-qw", "net.ipv4.ip_forward=1"},
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, strings.TrimSpace(string(out)))
		}
	}
	for _, path := range nodePaths {
		if err := os.MkdirAll(path, 0o755); err != nil {
			return err
		}
		if err := syscall.Mount("tmpfs", path, "tmpfs", 0, "mode=755"); err != nil {
			return fmt.Errorf("mount tmpfs on %s: %w", path, err)
		}
	}
	return nil
}

func (p *plane) startNode(ctx context.Context, apiURL string) error {
	n := p.node
	n.dir = filepath.Join(p.dir, "node")
	for _, d := range []string{"containerd", "cni/net.d", "kubelet", "pki"} {
		if err := os.MkdirAll(filepath.Join(n.dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := p.startContainerd(ctx); err != nil {
		return err
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	if err := p.startScheduler(ctx, apiURL, ports[0]); err != nil {
		return err
	}
	if err := p.startKubelet(ctx, apiURL); err != nil {
		return err
	}
	return p.startKubeProxy(ctx, apiURL, ports[1], ports[2])
}

func (p *plane) startContainerd(ctx context.Context) error {
	n := p.node
	root := filepath.Join(n.dir, "containerd")
	n.containerd = filepath.Join(root, "containerd.sock")
	// restrict_oom_score_adj: this sandbox refuses writes to oom_score_adj (no
	// CAP_SYS_RESOURCE), and runc fails to start a container that asks for one.
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[4]q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = %[5]q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[6]q
`, filepath.Join(root, "root"), filepath.Join(root, "state"), n.containerd, pauseImage,
		filepath.Join(root, "runc"), filepath.Join(n.dir, "cni/net.d"))
	if err := os.WriteFile(filepath.Join(root, "config.toml"), []byte(config), 0o600); err != nil {
		return err
	}
	if err := p.writeCNIConfig(); err != nil {
		return err
	}
	s, err := startServer("containerd", "containerd", []string{"--config", filepath.Join(root, "config.toml")},
		filepath.Join(p.dir, "containerd.log"))
	if err != nil {
		return err
	}
	p.servers = append(p.servers, s)
	ctrCmd := func(args ...string) *exec.Cmd {
		return exec.Command("ctr", append([]string{"--address", n.containerd, "--namespace", "k8s.io"}, args...)...)
	}
	if err := waitFor(ctx, s, "containerd's socket", func() (bool, string) {
		out, err := ctrCmd("version").CombinedOutput()
		return err == nil, string(out)
	}); err != nil {
		return err
	}
	pause := filepath.Join(n.images, "pause.tar")
	if out, err := ctrCmd("images", "import", pause).CombinedOutput(); err != nil {
		return fmt.Errorf("import %s: %v: %s", pause, err, out)
	}
	logf("containerd at %s (sandbox image %s imported)", n.containerd, pauseImage)
	return nil
}

// writeCNIConfig puts pods on a bridge inside the run's network namespace, with
// addresses from podCIDR; their traffic is masqueraded to the node's address.
func (p *plane) writeCNIConfig() error {
	n := p.node
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "scg-pods",
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  []any{[]any{map[string]any{"subnet": podCIDR}}},
					"routes":  []any{map[string]any{"dst": "0.0.0.0/0"}},
					"dataDir": filepath.Join(n.dir, "cni/ipam"),
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]any{"portMappings": true}},
		},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(n.dir, "cni/net.d/10-scg-pods.conflist"), data, 0o600)
}

// clientKubeconfig issues a client certificate for a component and writes its kubeconfig.
func (p *plane) clientKubeconfig(apiURL, name, cn string, orgs []string) (string, error) {
	pair, err := p.pki.clientCA.issue(cn, orgs, nil)
	if err != nil {
		return "", err
	}
	path := filepath.Join(p.dir, name+".kubeconfig")
	return path, writeKubeconfig(path, apiURL, p.pki.servingCA.certPEM(), cn, pair)
}

func (p *plane) startScheduler(ctx context.Context, apiURL string, port int) error {
	kubeconfig, err := p.clientKubeconfig(apiURL, "kube-scheduler", "system:kube-scheduler", nil)
	if err != nil {
		return err
	}
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + p.pki.servingCert,
		"--tls-private-key-file=" + p.pki.servingKey,
		"--leader-elect=false",
		"--profiling=false",
	}
	url := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := p.startHealthy(ctx, "kube-scheduler", args, url+"/healthz"); err != nil {
		return err
	}
	logf("kube-scheduler %s at %s", p.versions["kubernetes"], url)
	return nil
}

func (p *plane) startKubelet(ctx context.Context, apiURL string) error {
	n := p.node
	kubeconfig, err := p.clientKubeconfig(apiURL, "kubelet", "system:node:"+nodeName, []string{"system:nodes"})
	if err != nil {
		return err
	}
	// The default syncFrequency (1m) on purpose: the Secret-volume delay measured here
	// is the one a default kubelet gives. resolvConf "": no name server in pods, so no
	// lookup is ever sent anywhere.
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%s
cgroupDriver: cgroupfs
cgroupRoot: %s
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
address: %s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
resolvConf: ""
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %s}
authorization: {mode: Webhook}
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%%, imagefs.available: 1%%, nodefs.inodesFree: 1%%}
`, n.containerd, n.cgroupRoot, nodeIP, p.pki.clientCAFile)
	configPath := filepath.Join(n.dir, "kubelet/config.yaml")
	if err := os.WriteFile(configPath, []byte(config), 0o600); err != nil {
		return err
	}
	s, err := startServer("kubelet", filepath.Join(p.bin, "kubelet"), []string{
		"--config=" + configPath,
		"--kubeconfig=" + kubeconfig,
		"--root-dir=" + filepath.Join(n.dir, "kubelet"),
		"--cert-dir=" + filepath.Join(n.dir, "pki"),
		"--node-ip=" + nodeIP,
		"--hostname-override=" + nodeName,
	}, filepath.Join(p.dir, "kubelet.log"))
	if err != nil {
		return err
	}
	p.servers = append(p.servers, s)
	client, err := p.adminHTTPClient()
	if err != nil {
		return err
	}
	if err := waitFor(ctx, s, "node "+nodeName+" Ready", func() (bool, string) {
		return nodeReady(client, apiURL)
	}); err != nil {
		return err
	}
	logf("kubelet %s: node %s Ready at %s", p.versions["kubernetes"], nodeName, nodeIP)
	return nil
}

// nodeReady reports whether the node's Ready condition is True, and what was seen.
func nodeReady(client *http.Client, apiURL string) (bool, string) {
	resp, err := client.Get(apiURL + "/api/v1/nodes/" + nodeName)
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	var n struct {
		Status struct {
			Conditions []struct{ Type, Status, Reason, Message string }
		}
	}
	if resp.StatusCode != http.StatusOK {
		return false, "HTTP " + resp.Status
	}
	if err := json.NewDecoder(resp.Body).Decode(&n); err != nil {
		return false, err.Error()
	}
	for _, c := range n.Status.Conditions {
		if c.Type == "Ready" {
			return c.Status == "True", c.Reason + ": " + c.Message
		}
	}
	return false, "no Ready condition yet"
}

func (p *plane) startKubeProxy(ctx context.Context, apiURL string, port, metricsPort int) error {
	kubeconfig, err := p.clientKubeconfig(apiURL, "kube-proxy", "system:kube-proxy", nil)
	if err != nil {
		return err
	}
	healthz := fmt.Sprintf("127.0.0.1:%d", port)
	// conntrack settings at 0: kube-proxy leaves the kernel's (host-wide) values alone.
	s, err := startServer("kube-proxy", filepath.Join(p.bin, "kube-proxy"), []string{
		"--kubeconfig=" + kubeconfig,
		"--hostname-override=" + nodeName,
		"--proxy-mode=iptables",
		"--cluster-cidr=" + podCIDR,
		"--conntrack-max-per-core=0",
		"--conntrack-min=0",
		"--conntrack-tcp-timeout-established=0",
		"--conntrack-tcp-timeout-close-wait=0",
		"--healthz-bind-address=" + healthz,
		"--metrics-bind-address=" + fmt.Sprintf("127.0.0.1:%d", metricsPort),
	}, filepath.Join(p.dir, "kube-proxy.log"))
	if err != nil {
		return err
	}
	p.servers = append(p.servers, s)
	if err := waitHealthy(ctx, s, http.DefaultClient, "http://"+healthz+"/healthz", ""); err != nil {
		return err
	}
	logf("kube-proxy %s (iptables mode), healthz at %s", p.versions["kubernetes"], healthz)
	return nil
}

// waitFor polls check every 200 ms until it is true, the server exits, or ctx ends.
func waitFor(ctx context.Context, s *server, what string, check func() (bool, string)) error {
	var last string
	for {
		if s.exited() {
			return fmt.Errorf("%s exited while waiting for %s (%v); last log lines:\n%s", s.name, what, s.err, s.logTail(30))
		}
		ok, seen := check()
		if ok {
			return nil
		}
		last = seen
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not in time; last seen: %s\nlast log lines of %s:\n%s", what, firstLines(last, 12), s.name, s.logTail(30))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// auditPolicy logs every request's metadata, its answer's code included, so that a
// test can count what was refused to whom.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
`

// nodeAPIServerArgs are what the API server needs in node mode: pods reach it at the
// node's address, it reaches the kubelet with a client certificate, the kubelet's own
// requests are authorized by the Node authorizer, and every request is audited.
func (p *plane) nodeAPIServerArgs() ([]string, error) {
	n := p.node
	kubeletClient, err := p.pki.clientCA.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil)
	if err != nil {
		return nil, err
	}
	cert, key, err := kubeletClient.write(p.dir, "apiserver-kubelet-client")
	if err != nil {
		return nil, err
	}
	policy := filepath.Join(p.dir, "audit-policy.yaml")
	if err := os.WriteFile(policy, []byte(auditPolicy), 0o600); err != nil {
		return nil, err
	}
	n.auditLog = filepath.Join(p.dir, "audit.log")
	return []string{
		"--bind-address=0.0.0.0",
		"--advertise-address=" + nodeIP,
		"--authorization-mode=Node,RBAC",
		"--kubelet-client-certificate=" + cert,
		"--kubelet-client-key=" + key,
		"--kubelet-preferred-address-types=InternalIP",
		"--audit-policy-file=" + policy,
		"--audit-log-path=" + n.auditLog,
		"--audit-log-maxsize=0",
	}, nil
}

// env is what the command learns of the node.
func (n *node) env(apiPort int) []string {
	return []string{
		"SCG_TESTENV_NODE=" + nodeName,
		"SCG_TESTENV_NODE_IP=" + nodeIP,
		"SCG_TESTENV_NODE_API_URL=" + fmt.Sprintf("https://%s:%d", nodeIP, apiPort),
		"SCG_TESTENV_AUDIT_LOG=" + n.auditLog,
		// ctr reads these.
		"CONTAINERD_ADDRESS=" + n.containerd,
		"CONTAINERD_NAMESPACE=k8s.io",
	}
}

// unmountUnder detaches every mount below dir (the kubelet's volumes, containerd's
// snapshots), deepest first, so that the run's directory can be removed.
func unmountUnder(dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			points = append(points, fields[4])
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, mp := range points {
		_ = syscall.Unmount(mp, syscall.MNT_DETACH)
	}
}
