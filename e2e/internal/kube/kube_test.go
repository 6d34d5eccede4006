package kube

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseYAML(t *testing.T) {
	objs, err := ParseYAML("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n# only a comment\n---\n{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"b\", \"namespace\": \"a\"}}\n")
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 2 || objs[0].GetKind() != "Namespace" || objs[1].GetName() != "b" || objs[1].GetNamespace() != "a" {
		t.Errorf("parsed %v", objs)
	}
	if _, err := ParseYAML("kind: [unclosed"); err == nil {
		t.Error("bad YAML parsed")
	}
}

func TestPoll(t *testing.T) {
	n := 0
	err := Poll(context.Background(), time.Millisecond, time.Second, func(context.Context) (bool, error) {
		n++
		return n == 3, nil
	})
	if err != nil || n != 3 {
		t.Errorf("Poll = %v after %d calls, want nil after 3", err, n)
	}
	// On timeout, the condition's last complaint is the error, not the
	// context's.
	err = Poll(context.Background(), time.Millisecond, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		return false, errors.New("2 of 3 ready")
	})
	if err == nil || !strings.Contains(err.Error(), "2 of 3 ready") {
		t.Errorf("Poll timeout error %v, want the condition's complaint", err)
	}
}
