package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/xesp/xesp/control/sa"
)

// Client talks to the control API.
type Client struct {
	addr  string // as given, for messages
	base  string // scheme://host, no trailing slash
	hc    *http.Client
	token string
}

// Error is an error the server answered with.
type Error struct {
	Status  int
	Message string   // the server's message
	Errors  []string // the individual problems when there are several
}

func (e *Error) Error() string { return e.Message }

// NewClient returns a client for addr: "unix:/path" or a bare absolute
// path for the Unix socket, "https://host:port" for TCP over TLS
// (verified against the system's roots), or "http://host:port" for a
// plain loopback listener; on TCP token is sent as a bearer token. A
// token is never sent on a Unix socket: it would add nothing there and
// could leak through a misplaced socket.
func NewClient(addr, token string) (*Client, error) {
	return NewClientWith(addr, ClientOptions{Token: token})
}

// ClientOptions are a client's credentials and TLS settings.
type ClientOptions struct {
	Token string
	// TLS verifies an https server (and presents a client certificate
	// for mTLS); nil uses the system roots and no client certificate.
	// See ClientTLS.
	TLS *tls.Config
}

// NewClientWith is NewClient with TLS settings.
func NewClientWith(addr string, o ClientOptions) (*Client, error) {
	c := &Client{addr: addr}
	switch {
	case strings.HasPrefix(addr, "unix:") || strings.HasPrefix(addr, "/"):
		path := strings.TrimPrefix(addr, "unix:")
		if path == "" {
			return nil, fmt.Errorf("api address %q: empty socket path", addr)
		}
		c.base = "http://xesp"
		c.hc = &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
			MaxIdleConns: 4,
		}}
	case strings.HasPrefix(addr, "http://"), strings.HasPrefix(addr, "https://"):
		u, err := url.Parse(addr)
		if err != nil || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return nil, fmt.Errorf("api address %q: want https://host:port", addr)
		}
		if o.Token == "" {
			return nil, fmt.Errorf("api address %s: TCP needs a bearer token (--token, --token-file or XESP_TOKEN)", addr)
		}
		tr := &http.Transport{MaxIdleConns: 4, MaxIdleConnsPerHost: 4, TLSHandshakeTimeout: 10 * time.Second}
		if u.Scheme == "https" {
			cfg := o.TLS
			if cfg == nil {
				cfg = &tls.Config{MinVersion: tls.VersionTLS12}
			}
			tr.TLSClientConfig = cfg.Clone()
		} else if o.TLS != nil {
			return nil, fmt.Errorf("api address %s: TLS settings given for plain http: use https://", addr)
		}
		c.base = u.Scheme + "://" + u.Host
		c.hc = &http.Client{Transport: tr}
		c.token = o.Token
	default:
		return nil, fmt.Errorf("api address %q: want unix:/path or https://host:port", addr)
	}
	c.hc.Timeout = time.Minute
	return c, nil
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// Floods lists the SAs whose flood budgets XDP enforced.
func (c *Client) Floods(ctx context.Context) (Floods, error) {
	var f Floods
	err := c.do(ctx, http.MethodGet, "/v1/floods", nil, &f, http.StatusOK)
	return f, err
}

// Health returns the health report; a not-ok report is not an error.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	err := c.do(ctx, http.MethodGet, "/v1/health", nil, &h, http.StatusOK, http.StatusServiceUnavailable)
	return h, err
}

// Stats returns the gateway's totals.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	err := c.do(ctx, http.MethodGet, "/v1/stats", nil, &st, http.StatusOK)
	return st, err
}

// List returns one page: cursor "" for the first, limit 0 for the
// server's default.
func (c *Client) List(ctx context.Context, cursor string, limit int) (Page, error) {
	q := url.Values{}
	if cursor != "" {
		q.Set("cursor", cursor)
	}
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	path := "/v1/sas"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var p Page
	err := c.do(ctx, http.MethodGet, path, nil, &p, http.StatusOK)
	return p, err
}

// Each calls fn for every SA, page by page.
func (c *Client) Each(ctx context.Context, fn func(*SAView) error) error {
	cursor := ""
	for {
		p, err := c.List(ctx, cursor, 1000)
		if err != nil {
			return err
		}
		for i := range p.Items {
			if err := fn(&p.Items[i]); err != nil {
				return err
			}
		}
		if p.Next == "" {
			return nil
		}
		cursor = p.Next
	}
}

// Get returns the SA a reference names.
func (c *Client) Get(ctx context.Context, ref string) (SAView, error) {
	var v SAView
	err := c.do(ctx, http.MethodGet, refPath(ref), nil, &v, http.StatusOK)
	return v, err
}

// Add creates an SA. spec carries the keys as hex (see SpecOf).
func (c *Client) Add(ctx context.Context, spec sa.Spec) (SAView, error) {
	var v SAView
	err := c.do(ctx, http.MethodPost, "/v1/sas", spec, &v, http.StatusCreated)
	return v, err
}

// Update replaces the SA ref names by spec (keys included).
func (c *Client) Update(ctx context.Context, ref string, spec sa.Spec) (SAView, error) {
	var v SAView
	err := c.do(ctx, http.MethodPut, refPath(ref), spec, &v, http.StatusOK)
	return v, err
}

// Delete removes the SA a reference names and returns its last view.
func (c *Client) Delete(ctx context.Context, ref string) (SAView, error) {
	var v SAView
	err := c.do(ctx, http.MethodDelete, refPath(ref), nil, &v, http.StatusOK)
	return v, err
}

func refPath(ref string) string { return "/v1/sas/" + url.PathEscape(ref) }

func (c *Client) do(ctx context.Context, method, path string, in, out any, ok ...int) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		// The url.Error's text repeats the synthetic URL of the Unix
		// transport; the address the user gave says more.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("api %s: %s %s: %w", c.addr, method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("api: %s %s: read response: %w", method, path, err)
	}
	for _, s := range ok {
		if resp.StatusCode == s {
			if err := json.Unmarshal(data, out); err != nil {
				return fmt.Errorf("api: %s %s: decode response: %w", method, path, err)
			}
			return nil
		}
	}
	var eb errorBody
	if json.Unmarshal(data, &eb) != nil || eb.Error == "" {
		return &Error{Status: resp.StatusCode, Message: fmt.Sprintf("api: %s %s: %s", method, path, resp.Status)}
	}
	return &Error{Status: resp.StatusCode, Message: eb.Error, Errors: eb.Errors}
}

// IsStatus reports whether err is an API error with this HTTP status.
func IsStatus(err error, status int) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == status
}
