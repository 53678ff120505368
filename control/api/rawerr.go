package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
)

// net/http answers some malformed requests itself, before any handler
// runs: a bad request line or header (400), headers over MaxHeaderBytes
// (431), an unsupported Transfer-Encoding (501). It writes those
// straight to the connection as plain text, in one write, with these
// headers. The API promises JSON for every error, so the connections
// the API serves rewrite exactly such a write into the API's error body.
const netHTTPErrorHeaders = "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"

// jsonErrors is a listener whose connections turn net/http's own
// plain-text error responses into JSON ones.
type jsonErrors struct{ net.Listener }

func (l jsonErrors) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return jsonErrorConn{c}, nil
}

type jsonErrorConn struct{ net.Conn }

// CloseWrite lets net/http half-close after a 431, as on a bare
// connection, so the client reads the answer before the close.
func (c jsonErrorConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (c jsonErrorConn) Write(b []byte) (int, error) {
	if out, ok := rewriteRawError(b); ok {
		if _, err := c.Conn.Write(out); err != nil {
			return 0, err
		}
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// rewriteRawError turns "HTTP/1.x CODE TEXT" + netHTTPErrorHeaders + a
// plain-text message into the same status with a JSON error body. Any
// other write (every response a handler makes) is not one of these: the
// API's handlers never send text/plain.
func rewriteRawError(b []byte) ([]byte, bool) {
	if !bytes.HasPrefix(b, []byte("HTTP/1.")) {
		return nil, false
	}
	line, msg, ok := bytes.Cut(b, []byte(netHTTPErrorHeaders))
	if !ok || bytes.ContainsAny(line, "\r\n") {
		return nil, false
	}
	_, status, _ := bytes.Cut(line, []byte(" ")) // "431 Request Header Fields Too Large"
	code, err := strconv.Atoi(string(status[:min(3, len(status))]))
	if err != nil || http.StatusText(code) == "" {
		return nil, false
	}
	body, _ := json.Marshal(errorBody{Error: "request: " + string(msg)})
	body = append(body, '\n')
	return fmt.Appendf(nil, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
		code, http.StatusText(code), len(body), body), true
}
