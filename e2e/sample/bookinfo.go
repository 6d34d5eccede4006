package sample

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	ratingsv1 "github.com/amesh-dev/amesh/e2e/sample/ratings/v1"
)

// Details is the answer of details: GET /details/{id}.
type Details struct {
	ID        int      `json:"id"`
	Title     string   `json:"title"`
	Author    string   `json:"author"`
	Year      int      `json:"year"`
	Pages     int      `json:"pages"`
	ISBN13    string   `json:"isbn13"`
	Publisher string   `json:"publisher"`
	ServedBy  ServedBy `json:"servedBy"`
	Peer      Peer     `json:"peer"`
	Request   *Echo    `json:"request,omitempty"`
}

// Review is one review.
type Review struct {
	Reviewer string `json:"reviewer"`
	Text     string `json:"text"`
	// Stars are shown by reviews v2 (from ratings).
	Stars int32 `json:"stars,omitempty"`
}

// Rating is what reviews v2 got from ratings.
type Rating struct {
	Stars    int32    `json:"stars"`
	ServedBy ServedBy `json:"servedBy"`
	// Peer is the address ratings saw for reviews.
	Peer string `json:"peer"`
}

// Reviews is the answer of reviews: GET /reviews/{id}.
type Reviews struct {
	ID       int      `json:"id"`
	Reviews  []Review `json:"reviews"`
	Rating   *Rating  `json:"rating,omitempty"`
	ServedBy ServedBy `json:"servedBy"`
	Peer     Peer     `json:"peer"`
	Request  *Echo    `json:"request,omitempty"`
	// Errors name the upstream calls that failed (reviews v2 → ratings).
	Errors map[string]string `json:"errors,omitempty"`
}

// ProductPage is the answer of productpage: GET /productpage?id=N.
type ProductPage struct {
	ID       int      `json:"id"`
	ServedBy ServedBy `json:"servedBy"`
	Peer     Peer     `json:"peer"`
	Details  *Details `json:"details,omitempty"`
	Reviews  *Reviews `json:"reviews,omitempty"`
	Request  *Echo    `json:"request,omitempty"`
	// Errors name the upstream calls that failed; the status is then 502.
	Errors map[string]string `json:"errors,omitempty"`
}

// registerDetails adds details' routes.
func (s *httpServer) registerDetails() {
	s.mux.HandleFunc("GET /details/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, Error{Error: err.Error(), ServedBy: s.by})
			return
		}
		d := Details{
			ID: id, Title: "The Comedy of Errors", Author: "William Shakespeare", Year: 1595,
			Pages: 200, ISBN13: "978-1234567890", Publisher: "PublisherA",
			ServedBy: s.by, Peer: peerOf(r),
		}
		if wantEcho(r) {
			e := echoOf(r)
			d.Request = &e
		}
		writeJSON(w, http.StatusOK, d)
	})
	s.mux.HandleFunc("/", s.notFound)
}

// reviewsOf are the reviews of every product.
func reviewsOf() []Review {
	return []Review{
		{Reviewer: "Reviewer1", Text: "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"},
		{Reviewer: "Reviewer2", Text: "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."},
	}
}

// registerReviews adds reviews' routes; ratings is nil for v1.
func (s *httpServer) registerReviews(ratings ratingsv1.RatingsClient) {
	s.mux.HandleFunc("GET /reviews/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, Error{Error: err.Error(), ServedBy: s.by})
			return
		}
		out := Reviews{ID: id, Reviews: reviewsOf(), ServedBy: s.by, Peer: peerOf(r)}
		if wantEcho(r) {
			e := echoOf(r)
			out.Request = &e
		}
		code := http.StatusOK
		if ratings != nil {
			rating, err := s.getRating(r.Context(), ratings, id, r.Header)
			if err != nil {
				out.Errors = map[string]string{"ratings": err.Error()}
				code = http.StatusBadGateway
			} else {
				out.Rating = rating
				out.Reviews[0].Stars = rating.Stars
				out.Reviews[1].Stars = max(1, rating.Stars-1)
			}
		}
		writeJSON(w, code, out)
	})
	s.mux.HandleFunc("/", s.notFound)
}

// getRating calls ratings with the propagated headers as metadata.
func (s *httpServer) getRating(ctx context.Context, c ratingsv1.RatingsClient, id int, in http.Header) (*Rating, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.UpstreamTimeout)
	defer cancel()
	md := metadata.MD{}
	for _, h := range propagated {
		if v := in.Values(h); len(v) > 0 {
			md.Set(strings.ToLower(h), v...)
		}
	}
	ctx = metadata.NewOutgoingContext(ctx, md)
	resp, err := c.GetRating(ctx, &ratingsv1.GetRatingRequest{ProductId: strconv.Itoa(id)})
	if err != nil {
		return nil, fmt.Errorf("ratings: %w", err)
	}
	by := resp.GetServedBy()
	return &Rating{
		Stars: resp.GetStars(), Peer: resp.GetPeer(),
		ServedBy: ServedBy{Service: by.GetService(), Version: by.GetVersion(), Pod: by.GetPod(), Namespace: by.GetNamespace()},
	}, nil
}

// registerProductPage adds productpage's routes.
func (s *httpServer) registerProductPage(client *http.Client) {
	page := func(w http.ResponseWriter, r *http.Request) {
		id := 0
		if v := r.URL.Query().Get("id"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 1_000_000_000 {
				writeJSON(w, http.StatusBadRequest, Error{Error: "id " + strconv.Quote(v) + ": want an integer 0-1000000000", ServedBy: s.by})
				return
			}
			id = n
		}
		out := ProductPage{ID: id, ServedBy: s.by, Peer: peerOf(r)}
		if wantEcho(r) {
			e := echoOf(r)
			out.Request = &e
		}
		type result struct {
			name string
			err  error
		}
		done := make(chan result, 2)
		var details Details
		var reviews Reviews
		go func() {
			done <- result{"details", s.getJSON(r.Context(), client, s.cfg.DetailsURL, fmt.Sprintf("/details/%d", id), r.Header, &details)}
		}()
		go func() {
			done <- result{"reviews", s.getJSON(r.Context(), client, s.cfg.ReviewsURL, fmt.Sprintf("/reviews/%d", id), r.Header, &reviews)}
		}()
		for range 2 {
			res := <-done
			if res.err != nil {
				if out.Errors == nil {
					out.Errors = make(map[string]string)
				}
				out.Errors[res.name] = res.err.Error()
			}
		}
		if details.ServedBy.Pod != "" {
			out.Details = &details
		}
		if reviews.ServedBy.Pod != "" {
			out.Reviews = &reviews
		}
		code := http.StatusOK
		if len(out.Errors) > 0 {
			code = http.StatusBadGateway
		}
		if wantText(r) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(code)
			_, _ = io.WriteString(w, out.Text())
			return
		}
		writeJSON(w, code, out)
	}
	s.mux.HandleFunc("GET /productpage", page)
	s.mux.HandleFunc("GET /{$}", page)
	s.mux.HandleFunc("/", s.notFound)
}

// wantText reports whether the client asked for the text page.
func wantText(r *http.Request) bool {
	if f := r.URL.Query().Get("format"); f != "" {
		return f == "text"
	}
	return strings.HasPrefix(r.Header.Get("Accept"), "text/plain")
}

// maxUpstreamBody bounds what productpage reads of an upstream answer.
const maxUpstreamBody = 1 << 20

// getJSON GETs base+path with the propagated headers and decodes the JSON
// answer into v. A non-2xx answer is an error that says who answered it.
func (s *httpServer) getJSON(ctx context.Context, client *http.Client, base, path string, in http.Header, v any) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.UpstreamTimeout)
	defer cancel()
	u, err := url.JoinPath(base, path)
	if err != nil {
		return fmt.Errorf("upstream URL: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("upstream request: %w", err)
	}
	copyPropagated(req.Header, in)
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxUpstreamBody))
	if err != nil {
		return fmt.Errorf("GET %s: reading the answer: %w", u, err)
	}
	if resp.StatusCode/100 != 2 {
		who := resp.Header.Get(HeaderServedBy)
		if who == "" {
			who = "no amesh sample instance" // a proxy answered
		}
		msg := fmt.Sprintf("GET %s: %s (served by %s)", u, resp.Status, who)
		if resp.Header.Get(HeaderFault) == "abort" {
			msg += " [injected fault]"
		}
		return errors.New(msg)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: decoding the answer: %w", u, err)
	}
	return nil
}

// Text renders the page for a person: who served each hop and what it saw.
func (p ProductPage) Text() string {
	var b strings.Builder
	hop := func(indent string, by ServedBy, peer string) {
		fmt.Fprintf(&b, "%s%s %s  pod %s/%s  saw client %s\n", indent, by.Service, by.Version, by.Namespace, by.Pod, peer)
	}
	hop("", p.ServedBy, p.Peer.RemoteAddr)
	if d := p.Details; d != nil {
		hop("├─ ", d.ServedBy, d.Peer.RemoteAddr)
		fmt.Fprintf(&b, "│    %q by %s (%d), %d pages\n", d.Title, d.Author, d.Year, d.Pages)
	}
	if r := p.Reviews; r != nil {
		hop("└─ ", r.ServedBy, r.Peer.RemoteAddr)
		for _, rv := range r.Reviews {
			stars := ""
			if rv.Stars > 0 {
				stars = " " + strings.Repeat("★", int(rv.Stars)) + strings.Repeat("☆", 5-int(min(rv.Stars, 5)))
			}
			fmt.Fprintf(&b, "     %s%s\n", rv.Reviewer, stars)
		}
		if rt := r.Rating; rt != nil {
			hop("     └─ ", rt.ServedBy, rt.Peer)
		}
		for _, k := range sortedKeys(r.Errors) {
			fmt.Fprintf(&b, "     error %s: %s\n", k, r.Errors[k])
		}
	}
	for _, k := range sortedKeys(p.Errors) {
		fmt.Fprintf(&b, "error %s: %s\n", k, p.Errors[k])
	}
	return b.String()
}

// grpcPeer returns the client address of a gRPC call.
func grpcPeer(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

// dialRatings returns a lazily connecting client of ratings (no I/O here).
func dialRatings(addr string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("ratings client %s: %w", addr, err)
	}
	return conn, nil
}

// upstreamClient is productpage's HTTP client: keep-alive pooled, bounded.
func upstreamClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = 64
	t.IdleConnTimeout = 60 * time.Second
	return &http.Client{Transport: t}
}
