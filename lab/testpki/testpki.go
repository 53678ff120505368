// Package testpki makes throwaway X.509 material for tests with
// crypto/x509: a CA and certificates it signs for servers (with their IP
// addresses and names) and clients, written as PEM files (keys 0600).
//
// It owns nothing the product uses: only tests and the lab import it
// (cmd/xesp's deps_test keeps it out of the daemon). Tests use New and the
// methods taking a testing.TB; the lab (lab/ims, also run by
// `xesp-lab demo -ims`) uses Make and Issue, which return errors.
package testpki

import (
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
	"testing"
	"time"
)

// CA is a certificate authority for one test.
type CA struct {
	Cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// PEM is the CA certificate; Path its file (in the dir given to New).
	PEM  []byte
	Path string
	dir  string
}

// New makes a CA and writes its certificate to dir/<name>-ca.crt.
func New(t testing.TB, dir, name string) *CA {
	t.Helper()
	ca, err := Make(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// Make is New for code that is not a test.
func Make(dir, name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	sn, err := serial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn, Subject: pkix.Name{CommonName: name + " test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("testpki: CA %s: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("testpki: CA %s: %w", name, err)
	}
	ca := &CA{Cert: cert, key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), dir: dir}
	ca.Path = filepath.Join(dir, name+"-ca.crt")
	if err := os.WriteFile(ca.Path, ca.PEM, 0o644); err != nil {
		return nil, fmt.Errorf("testpki: %w", err)
	}
	return ca, nil
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
}

// Pair is a certificate and key as PEM files.
type Pair struct {
	CertPath, KeyPath string
	CertPEM, KeyPEM   []byte
}

// Server issues a server certificate for hosts (IP addresses or names)
// and writes dir/<name>.crt and dir/<name>.key (0600).
func (ca *CA) Server(t testing.TB, name string, hosts ...string) Pair {
	t.Helper()
	return ca.issue(t, name, hosts, x509.ExtKeyUsageServerAuth)
}

// Client issues a client certificate with common name cn.
func (ca *CA) Client(t testing.TB, name string) Pair {
	t.Helper()
	return ca.issue(t, name, nil, x509.ExtKeyUsageClientAuth)
}

// Both issues a certificate good for serving hosts and as a client (an
// etcd member's, which dials its peers too).
func (ca *CA) Both(t testing.TB, name string, hosts ...string) Pair {
	t.Helper()
	return ca.issue(t, name, hosts, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
}

func (ca *CA) issue(t testing.TB, name string, hosts []string, usage ...x509.ExtKeyUsage) Pair {
	p, err := ca.Issue(name, hosts, usage...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Issue is Server, Client or Both for code that is not a test: a
// certificate with common name name, valid for hosts (IP addresses or
// names) and usage, written as dir/<name>.crt and dir/<name>.key (0600).
func (ca *CA) Issue(name string, hosts []string, usage ...x509.ExtKeyUsage) (Pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Pair{}, err
	}
	sn, err := serial()
	if err != nil {
		return Pair{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: sn, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: usage,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return Pair{}, fmt.Errorf("testpki: %s: %w", name, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return Pair{}, fmt.Errorf("testpki: %s: %w", name, err)
	}
	p := Pair{CertPath: filepath.Join(ca.dir, name+".crt"), KeyPath: filepath.Join(ca.dir, name+".key"),
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})}
	if err := os.WriteFile(p.CertPath, p.CertPEM, 0o644); err != nil {
		return Pair{}, fmt.Errorf("testpki: %w", err)
	}
	if err := os.WriteFile(p.KeyPath, p.KeyPEM, 0o600); err != nil {
		return Pair{}, fmt.Errorf("testpki: %w", err)
	}
	return p, nil
}
