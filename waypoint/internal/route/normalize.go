package route

import (
	"errors"
	"strings"
)

// ErrBadPath is returned by Normalize for paths the waypoint refuses (400):
// not absolute, or with encoded slashes or backslashes, which would let a
// request match one rule or policy and reach a different resource.
var ErrBadPath = errors.New("bad request path")

// Normalize returns the escaped request path with "." and ".." segments
// removed (RFC 3986 §5.2.4), so that routes and policies see what the backend
// will. rawPath is the path as sent (URL.EscapedPath()).
func Normalize(rawPath string) (string, error) {
	if rawPath == "" {
		return "/", nil
	}
	if rawPath[0] != '/' {
		return "", ErrBadPath
	}
	lower := strings.ToLower(rawPath)
	if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") || strings.Contains(rawPath, "\\") || strings.Contains(lower, "%00") {
		return "", ErrBadPath
	}
	if !strings.Contains(rawPath, ".") && !strings.Contains(lower, "%2e") {
		return rawPath, nil
	}
	segs := strings.Split(rawPath[1:], "/")
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		last := i == len(segs)-1
		switch strings.ReplaceAll(strings.ToLower(s), "%2e", ".") {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, s)
		}
	}
	return "/" + strings.Join(out, "/"), nil
}
