// Package filter applies Gateway API HTTPRoute filters: request and response
// header modifiers, request redirects and URL rewrites.
package filter

import (
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	discoveryv1 "github.com/amesh-dev/amesh/api/discovery/v1"
)

// ModifyHeaders applies a HeaderModifier: set overwrites, add appends, remove
// deletes, in that order. host receives a "Host" set or add (Go keeps the
// authority outside the header map); it may be nil.
func ModifyHeaders(h http.Header, m *discoveryv1.HeaderModifier, host *string) {
	if m == nil {
		return
	}
	for _, s := range m.GetSet() {
		if host != nil && strings.EqualFold(s.GetName(), "host") {
			*host = s.GetValue()
			continue
		}
		h.Set(s.GetName(), s.GetValue())
	}
	for _, a := range m.GetAdd() {
		if host != nil && strings.EqualFold(a.GetName(), "host") {
			*host = a.GetValue()
			continue
		}
		h.Add(a.GetName(), a.GetValue())
	}
	for _, r := range m.GetRemove() {
		h.Del(r)
	}
}

// ReplacePath applies a PathModifier to path. prefix is the matched path
// prefix (from a Prefix path match); ReplacePrefixMatch without one leaves
// the path as it is.
func ReplacePath(path, prefix string, m *discoveryv1.PathModifier) string {
	switch k := m.GetKind().(type) {
	case *discoveryv1.PathModifier_ReplaceFullPath:
		if k.ReplaceFullPath == "" {
			return "/"
		}
		return k.ReplaceFullPath
	case *discoveryv1.PathModifier_ReplacePrefixMatch:
		if prefix == "" {
			return path
		}
		return replacePrefix(path, prefix, k.ReplacePrefixMatch)
	}
	return path
}

// replacePrefix follows the Gateway API table for ReplacePrefixMatch: the
// matched prefix (ignoring its trailing slash) is replaced; the remainder is
// kept, with exactly one slash between.
func replacePrefix(path, prefix, repl string) string {
	prefix = strings.TrimRight(prefix, "/")
	rest := path[min(len(prefix), len(path)):]
	repl = strings.TrimRight(repl, "/")
	switch {
	case rest == "" && repl == "":
		return "/"
	case rest == "":
		return repl
	default:
		// rest starts with "/".
		return repl + rest
	}
}

// Redirect computes the Location and status code of a RequestRedirect for r.
// scheme is the scheme the client used ("http" inside the mesh) and port the
// service port the request arrived on; path is the normalised request path
// (decoded, as matched) and prefix the matched path prefix. The Location's
// path is escaped.
func Redirect(r *http.Request, rd *discoveryv1.RequestRedirect, scheme string, port uint32, path, prefix string) (string, int) {
	code := int(rd.GetStatusCode())
	if code == 0 {
		code = http.StatusFound
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if rd.GetHostname() != "" {
		host = rd.GetHostname()
	}
	outScheme := scheme
	if rd.GetScheme() != "" {
		outScheme = rd.GetScheme()
	}
	outPort := port
	switch {
	case rd.GetPort() != 0:
		outPort = rd.GetPort()
	case rd.GetScheme() != "":
		outPort = wellKnownPort(rd.GetScheme())
	}
	if rd.GetPath() != nil {
		path = ReplacePath(path, prefix, rd.GetPath())
	}
	// The Location needs the path escaped: a decoded "?" or "#" would
	// start a query or fragment. The client's own escaping is kept when
	// the path is unchanged.
	path = (&url.URL{Path: path, RawPath: r.URL.RawPath}).EscapedPath()
	authority := host
	if outPort != 0 && outPort != wellKnownPort(outScheme) {
		authority = net.JoinHostPort(host, strconv.Itoa(int(outPort)))
	} else if strings.Contains(host, ":") {
		authority = "[" + host + "]"
	}
	loc := outScheme + "://" + authority + path
	if r.URL.RawQuery != "" {
		loc += "?" + r.URL.RawQuery
	}
	return loc, code
}

func wellKnownPort(scheme string) uint32 {
	switch strings.ToLower(scheme) {
	case "http":
		return 80
	case "https":
		return 443
	}
	return 0
}
