package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// The whole control plane lives for one command, so every key is fresh and short-lived:
// nothing generated here can be reused against another run.
const certLifetime = 48 * time.Hour

type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newKey() (crypto.Signer, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
}

func newCA(name string) (*keyPair, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"scg-testenv"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(certLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	return sign(tmpl, key, tmpl, key)
}

// issue signs a leaf certificate: a serving one when hosts is non-empty, else a client one
// whose CN and O become the Kubernetes user name and groups.
func (ca *keyPair) issue(cn string, orgs []string, hosts []string) (*keyPair, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(certLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if len(hosts) > 0 {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, h := range hosts {
			if ip := net.ParseIP(h); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		}
	}
	return sign(tmpl, key, ca.cert, ca.key)
}

func sign(tmpl *x509.Certificate, key crypto.Signer, parent *x509.Certificate, parentKey crypto.Signer) (*keyPair, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, fmt.Errorf("sign %q: %w", tmpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &keyPair{cert: cert, key: key}, nil
}

func (p *keyPair) certPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.cert.Raw})
}

func keyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func publicKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// write stores the pair as NAME.crt and NAME.key in dir and returns both paths.
func (p *keyPair) write(dir, name string) (certFile, keyFile string, err error) {
	kp, err := keyPEM(p.key)
	if err != nil {
		return "", "", err
	}
	certFile = filepath.Join(dir, name+".crt")
	keyFile = filepath.Join(dir, name+".key")
	if err := os.WriteFile(certFile, p.certPEM(), 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(keyFile, kp, 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

// pki is everything the three components and the admin need, written under dir.
type pki struct {
	servingCA     *keyPair
	clientCA      *keyPair
	admin         *keyPair
	kcm           *keyPair
	servingCAFile string
	clientCAFile  string
	clientCAKey   string
	servingCert   string
	servingKey    string
	saPublicKey   string
	saPrivateKey  string
}

// newPKI follows envtest's layout: one CA for serving certificates, another whose
// client certificates the API server trusts, and a separate service-account signing key.
//
// extraHosts are more names for the API server's serving certificate: the node's address
// in node mode, where pods reach the API server there.
func newPKI(dir string, extraHosts ...string) (*pki, error) {
	p := &pki{}
	var err error
	if p.servingCA, err = newCA("scg-testenv-serving-ca"); err != nil {
		return nil, err
	}
	if p.clientCA, err = newCA("scg-testenv-client-ca"); err != nil {
		return nil, err
	}
	// The in-cluster names let a client that resolves kubernetes.default.svc verify too.
	serving, err := p.servingCA.issue("127.0.0.1", nil, append([]string{
		"127.0.0.1", "localhost", serviceIP,
		"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
	}, extraHosts...))
	if err != nil {
		return nil, err
	}
	if p.admin, err = p.clientCA.issue("scg-testenv-admin", []string{"system:masters"}, nil); err != nil {
		return nil, err
	}
	if p.kcm, err = p.clientCA.issue("system:kube-controller-manager", nil, nil); err != nil {
		return nil, err
	}
	if p.servingCAFile, _, err = p.servingCA.write(dir, "serving-ca"); err != nil {
		return nil, err
	}
	if p.clientCAFile, p.clientCAKey, err = p.clientCA.write(dir, "client-ca"); err != nil {
		return nil, err
	}
	if p.servingCert, p.servingKey, err = serving.write(dir, "serving"); err != nil {
		return nil, err
	}
	return p, p.writeServiceAccountKeys(dir)
}

func (p *pki) writeServiceAccountKeys(dir string) error {
	sa, err := newKey()
	if err != nil {
		return err
	}
	priv, err := keyPEM(sa)
	if err != nil {
		return err
	}
	pub, err := publicKeyPEM(sa)
	if err != nil {
		return err
	}
	p.saPrivateKey = filepath.Join(dir, "sa.key")
	p.saPublicKey = filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(p.saPrivateKey, priv, 0o600); err != nil {
		return err
	}
	return os.WriteFile(p.saPublicKey, pub, 0o600)
}
