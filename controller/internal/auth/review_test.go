package auth

import (
	"context"
	"encoding/base64"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// fakeReviews answers TokenReviews from a table and counts calls.
func fakeReviews(t *testing.T, answer func(token string, audiences []string) authnv1.TokenReviewStatus) (*fake.Clientset, *atomic.Int32) {
	t.Helper()
	cs := fake.NewClientset()
	var calls atomic.Int32
	cs.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		calls.Add(1)
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		if tr.Spec.Token == "apiserver-down" {
			return true, nil, fmt.Errorf("connection refused")
		}
		tr.Status = answer(tr.Spec.Token, tr.Spec.Audiences)
		return true, tr, nil
	})
	return cs, &calls
}

func jwtWithExp(exp time.Time) string {
	payload := base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, `{"exp":%d}`, exp.Unix()))
	return "eyJhbGciOiJSUzI1NiJ9." + payload + ".sig"
}

func TestReviewer(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { return now }
	cs, calls := fakeReviews(t, func(token string, auds []string) authnv1.TokenReviewStatus {
		switch token {
		case "user":
			return authnv1.TokenReviewStatus{Authenticated: true, Audiences: auds, User: authnv1.UserInfo{Username: "alice"}}
		case "wrong-audience":
			return authnv1.TokenReviewStatus{Authenticated: true, Audiences: []string{"other"},
				User: authnv1.UserInfo{Username: "system:serviceaccount:ns:sa"}}
		case "bad":
			return authnv1.TokenReviewStatus{Authenticated: false, Error: "invalid bearer token"}
		}
		return authnv1.TokenReviewStatus{Authenticated: true, Audiences: auds, User: authnv1.UserInfo{
			Username: "system:serviceaccount:amesh-system:ztunnel",
			Extra: map[string]authnv1.ExtraValue{
				extraPodName: {"ztunnel-x"}, extraPodUID: {"uid-1"}, extraNodeName: {"node-a"},
			},
		}}
	})
	r := NewReviewer(cs.AuthenticationV1().TokenReviews(), ReviewerOptions{Now: clock, TTL: time.Minute, NegativeTTL: 5 * time.Second})
	ctx := context.Background()

	short := jwtWithExp(now.Add(10 * time.Second))
	c, err := r.Review(ctx, short)
	if err != nil {
		t.Fatal(err)
	}
	if *c != (Caller{Namespace: "amesh-system", ServiceAccount: "ztunnel", PodName: "ztunnel-x", PodUID: "uid-1", NodeName: "node-a"}) {
		t.Fatalf("caller %+v", c)
	}
	// Cached...
	if _, err := r.Review(ctx, short); err != nil || calls.Load() != 1 {
		t.Fatalf("second review: %v, %d API calls", err, calls.Load())
	}
	// ...but never beyond the token's own expiry.
	now = now.Add(11 * time.Second)
	if _, err := r.Review(ctx, short); err != nil || calls.Load() != 2 {
		t.Fatalf("after expiry: %v, %d API calls", err, calls.Load())
	}

	for _, tc := range []struct {
		token string
		code  codes.Code
	}{
		{"bad", codes.Unauthenticated},
		{"user", codes.Unauthenticated},
		{"wrong-audience", codes.Unauthenticated},
		{"apiserver-down", codes.Unavailable},
	} {
		if _, err := r.Review(ctx, tc.token); status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %v", tc.token, err, tc.code)
		}
	}
	// Refusals are cached briefly, apiserver failures not at all.
	before := calls.Load()
	_, _ = r.Review(ctx, "bad")
	_, _ = r.Review(ctx, "apiserver-down")
	if got := calls.Load() - before; got != 1 {
		t.Errorf("%d API calls for a cached refusal and an outage, want 1", got)
	}
	now = now.Add(6 * time.Second)
	_, _ = r.Review(ctx, "bad")
	if got := calls.Load() - before; got != 2 {
		t.Errorf("refusal not re-checked after its TTL: %d calls", got)
	}
}

// TestReviewerSingleflight: concurrent reviews of one token make one call.
func TestReviewerSingleflight(t *testing.T) {
	release := make(chan struct{})
	cs := fake.NewClientset()
	var calls atomic.Int32
	cs.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		calls.Add(1)
		<-release
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview).DeepCopy()
		tr.Status = authnv1.TokenReviewStatus{Authenticated: true, Audiences: tr.Spec.Audiences,
			User: authnv1.UserInfo{Username: "system:serviceaccount:ns:sa"}}
		return true, tr, nil
	})
	r := NewReviewer(cs.AuthenticationV1().TokenReviews(), ReviewerOptions{})
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if _, err := r.Review(context.Background(), "tok"); err != nil {
				t.Error(err)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d TokenReview calls for 20 concurrent reviews", n)
	}
}

func FuzzTokenExpiry(f *testing.F) {
	f.Add(jwtWithExp(time.Unix(1, 0)))
	f.Add("a.b.c")
	f.Add("")
	f.Add("x." + base64.RawURLEncoding.EncodeToString([]byte(`{"exp":1e400}`)) + ".y")
	f.Fuzz(func(t *testing.T, tok string) {
		tokenExpiry(tok) // must not panic
	})
}

func FuzzParseServiceAccount(f *testing.F) {
	for _, s := range []string{"system:serviceaccount:ns:sa", "system:serviceaccount::", "system:serviceaccount:a:b:c", "alice"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, user string) {
		ns, sa, ok := parseServiceAccount(user)
		if ok && "system:serviceaccount:"+ns+":"+sa != user {
			t.Fatalf("%q parsed as %q/%q", user, ns, sa)
		}
	})
}
