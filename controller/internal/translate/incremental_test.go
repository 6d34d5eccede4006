package translate

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestTranslatorIncremental applies random changes, as informers deliver
// them (a changed object is a new object), to every golden input and checks
// after each one that a long-lived Translator, reusing per-pod results,
// gives exactly what a fresh translation gives.
func TestTranslatorIncremental(t *testing.T) {
	files, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			in := loadInput(t, f)
			tr := NewTranslator(Config{})
			r := rand.New(rand.NewPCG(3, 4))
			for step := range 60 {
				what := mutate(r, in, step)
				got := render(t, tr.Translate(in))
				want := render(t, Translate(Config{}, in))
				if !bytes.Equal(got, want) {
					t.Fatalf("step %d (%s): incremental output differs (-fresh +incremental):\n%s", step, what, cmp.Diff(string(want), string(got)))
				}
			}
		})
	}
}

// mutate changes the input the way a watch would and says what it did.
func mutate(r *rand.Rand, in *Input, step int) string {
	switch r.IntN(8) {
	case 0, 1, 2: // change a pod's labels (the commonest event)
		if len(in.Pods) == 0 {
			return "nothing"
		}
		i := r.IntN(len(in.Pods))
		p := in.Pods[i].DeepCopy()
		if p.Labels == nil {
			p.Labels = map[string]string{}
		}
		keys := []string{"app", "tier", "version", "amesh.dev/dataplane-mode", "amesh.dev/use-waypoint"}
		vals := []string{"web", "db", "reviews", "ledger", "api", "ambient", "none", "waypoint", "wl-waypoint"}
		k := keys[r.IntN(len(keys))]
		if r.IntN(3) == 0 {
			delete(p.Labels, k)
		} else {
			p.Labels[k] = vals[r.IntN(len(vals))]
		}
		in.Pods[i] = p
		return "relabel pod " + p.Name
	case 3: // delete a pod
		if len(in.Pods) == 0 {
			return "nothing"
		}
		i := r.IntN(len(in.Pods))
		name := in.Pods[i].Name
		in.Pods = slices.Delete(in.Pods, i, i+1)
		return "delete pod " + name
	case 4: // add a pod
		ns := "default"
		if len(in.Namespaces) > 0 {
			ns = in.Namespaces[r.IntN(len(in.Namespaces))].Name
		}
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name: fmt.Sprintf("new-%d", step), Namespace: ns, UID: types.UID(fmt.Sprintf("new-uid-%d", step)),
				Labels: map[string]string{"app": []string{"web", "ledger", "reviews", "db"}[r.IntN(4)]},
			},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: fmt.Sprintf("10.200.0.%d", step)},
		}
		in.Pods = append(in.Pods, p)
		return "add pod " + p.Name
	case 7: // readdress a pod, maybe to an address an EndpointSlice names
		if len(in.Pods) == 0 {
			return "nothing"
		}
		addrs := []string{fmt.Sprintf("10.201.0.%d", step)}
		for _, es := range in.EndpointSlices {
			for _, e := range es.Endpoints {
				addrs = append(addrs, e.Addresses...)
			}
		}
		i := r.IntN(len(in.Pods))
		p := in.Pods[i].DeepCopy()
		a := addrs[r.IntN(len(addrs))]
		p.Status.PodIP, p.Status.PodIPs = a, []corev1.PodIP{{IP: a}}
		in.Pods[i] = p
		return "readdress pod " + p.Name + " to " + a
	case 5: // touch a service (new object, maybe relabelled)
		if len(in.Services) == 0 {
			return "nothing"
		}
		i := r.IntN(len(in.Services))
		s := in.Services[i].DeepCopy()
		if r.IntN(2) == 0 {
			if s.Labels == nil {
				s.Labels = map[string]string{}
			}
			s.Labels["amesh.dev/use-waypoint"] = "none"
		}
		in.Services[i] = s
		return "update service " + s.Name
	default: // touch a namespace
		if len(in.Namespaces) == 0 {
			return "nothing"
		}
		i := r.IntN(len(in.Namespaces))
		n := in.Namespaces[i].DeepCopy()
		if n.Labels == nil {
			n.Labels = map[string]string{}
		}
		if n.Labels["amesh.dev/dataplane-mode"] == "ambient" {
			delete(n.Labels, "amesh.dev/dataplane-mode")
		} else {
			n.Labels["amesh.dev/dataplane-mode"] = "ambient"
		}
		in.Namespaces[i] = n
		return "toggle namespace " + n.Name
	}
}

// BenchmarkTranslatePodUpdate measures a translation after one pod changed
// (the steady state of a busy cluster) at the scale, next to the
// full translation of the same input.
func BenchmarkTranslatePodUpdate(b *testing.B) {
	in := scaleInput(10, 1000, 10000)
	b.Run("full", func(b *testing.B) {
		for b.Loop() {
			Translate(Config{}, in)
		}
	})
	b.Run("one-pod-changed", func(b *testing.B) {
		tr := NewTranslator(Config{})
		tr.Translate(in)
		i := 0
		for b.Loop() {
			p := in.Pods[i%len(in.Pods)].DeepCopy()
			p.Labels["version"] = fmt.Sprintf("v%d", i)
			in.Pods[i%len(in.Pods)] = p
			tr.Translate(in)
			i++
		}
	})
}
