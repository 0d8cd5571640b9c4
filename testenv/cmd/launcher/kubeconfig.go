package main

import (
	"encoding/base64"
	"fmt"
	"os"
)

// writeKubeconfig writes a self-contained kubeconfig (all data inline) so it stays valid
// wherever the command copies it, for as long as the control plane runs.
func writeKubeconfig(path, server string, ca []byte, user string, client *keyPair) error {
	key, err := keyPEM(client.key)
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	body := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: scg-testenv
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: scg-testenv
  context:
    cluster: scg-testenv
    user: %s
    namespace: default
current-context: scg-testenv
`, server, b64(ca), user, b64(client.certPEM()), b64(key), user)
	return os.WriteFile(path, []byte(body), 0o600)
}
