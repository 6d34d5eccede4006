package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// ownedConditions are the pod conditions the node sets.
var ownedConditions = map[corev1.PodConditionType]bool{
	corev1.PodReadyToStartContainers: true,
	corev1.PodInitialized:            true,
	corev1.ContainersReady:           true,
	corev1.PodReady:                  true,
}

func (w *worker) containerStatus(c *ctr, initializing bool) corev1.ContainerStatus {
	st := corev1.ContainerStatus{
		Name:         c.spec.Name,
		Image:        c.spec.Image,
		ImageID:      "amesh-local://" + c.spec.Image,
		RestartCount: c.restarts,
		Ready:        c.running && c.ready && c.started && !c.stopping,
	}
	started := c.running && c.started
	st.Started = &started
	if c.running || c.term != nil {
		st.ContainerID = c.id
	}
	switch {
	case c.running:
		st.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(c.startedAt)}
		if c.term != nil {
			st.LastTerminationState.Terminated = c.term
		}
	case c.term != nil && w.willRestart(c) && !w.deleting() && !w.finished:
		st.State.Waiting = &corev1.ContainerStateWaiting{
			Reason:  "CrashLoopBackOff",
			Message: fmt.Sprintf("back-off %s restarting failed container=%s pod=%s_%s(%s)", c.backoff, c.spec.Name, w.name, w.namespace, w.uid),
		}
		if c.startErr != "" {
			st.State.Waiting.Reason, st.State.Waiting.Message = c.waitReason, c.startErr
		}
		st.LastTerminationState.Terminated = c.term
	case c.term != nil:
		st.State.Terminated = c.term
	case c.startErr != "":
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waitReason, Message: c.startErr}
	case initializing:
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: "PodInitializing"}
	default:
		st.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}
	}
	return st
}

// computeStatus derives the pod's status from the worker's state.
func (w *worker) computeStatus() corev1.PodStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	pod := w.pod
	st := corev1.PodStatus{
		QOSClass:           pod.Status.QOSClass,
		ObservedGeneration: pod.Generation,
		HostIP:             w.a.cfg.NodeIP.String(),
		HostIPs:            []corev1.HostIP{{IP: w.a.cfg.NodeIP.String()}},
	}
	if !w.startTime.IsZero() {
		t := w.startTime
		st.StartTime = &t
	}
	if w.sb != nil {
		st.PodIP = w.sb.ips[0].String()
		for _, ip := range w.sb.ips {
			st.PodIPs = append(st.PodIPs, corev1.PodIP{IP: ip.String()})
		}
	} else if pod.Spec.HostNetwork || w.finished {
		st.PodIP, st.PodIPs = pod.Status.PodIP, pod.Status.PodIPs
	}

	initDone := true
	initFailed := false
	for i := range pod.Spec.InitContainers {
		c := w.ctrs[pod.Spec.InitContainers[i].Name]
		st.InitContainerStatuses = append(st.InitContainerStatuses, w.containerStatus(c, false))
		switch {
		case c.sidecar:
			if !(c.running && c.started) && !w.finished {
				initDone = false
			}
		case c.term != nil && c.term.ExitCode == 0:
		default:
			initDone = false
			if c.term != nil && !w.willRestart(c) {
				initFailed = true
			}
		}
	}
	allReady := true
	anyRunning, allDone, allSucceeded, anyStarted := false, true, true, false
	for i := range pod.Spec.Containers {
		c := w.ctrs[pod.Spec.Containers[i].Name]
		cs := w.containerStatus(c, !initDone)
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
		if !cs.Ready {
			allReady = false
		}
		if c.running {
			anyRunning = true
		}
		if c.everStarted {
			anyStarted = true
		}
		if c.running || c.term == nil || (w.willRestart(c) && !w.finished) {
			allDone = false
		}
		if c.term == nil || c.term.ExitCode != 0 {
			allSucceeded = false
		}
	}

	switch {
	case initFailed:
		st.Phase = corev1.PodFailed
	case allDone && len(pod.Spec.Containers) > 0 && anyStarted:
		if allSucceeded {
			st.Phase = corev1.PodSucceeded
		} else {
			st.Phase = corev1.PodFailed
		}
	case anyRunning || (anyStarted && initDone):
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}

	now := metav1.Now()
	set := func(t corev1.PodConditionType, ok bool, reason, msg string) {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
			reason, msg = "", ""
		}
		c := corev1.PodCondition{Type: t, Status: s, Reason: reason, Message: msg, LastTransitionTime: now, ObservedGeneration: pod.Generation}
		if old, ok := w.conds[t]; ok && old.Status == s {
			c.LastTransitionTime = old.LastTransitionTime
		}
		w.conds[t] = c
	}
	set(corev1.PodReadyToStartContainers, w.sb != nil, "", "")
	set(corev1.PodInitialized, initDone, "ContainersNotInitialized", "containers with incomplete status: init containers")
	finished := st.Phase == corev1.PodSucceeded || st.Phase == corev1.PodFailed
	set(corev1.ContainersReady, allReady && !finished, "ContainersNotReady", "containers with unready status")
	ready := allReady && !finished
	for _, g := range pod.Spec.ReadinessGates {
		found := false
		for _, c := range pod.Status.Conditions {
			if c.Type == g.ConditionType && c.Status == corev1.ConditionTrue {
				found = true
			}
		}
		if !found {
			ready = false
		}
	}
	reason := "ContainersNotReady"
	if finished {
		reason = "PodCompleted"
	}
	set(corev1.PodReady, ready, reason, "containers with unready status")
	for _, c := range pod.Status.Conditions {
		if !ownedConditions[c.Type] {
			st.Conditions = append(st.Conditions, c)
		}
	}
	for _, t := range []corev1.PodConditionType{corev1.PodReadyToStartContainers, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		st.Conditions = append(st.Conditions, w.conds[t])
	}
	return st
}

// pushStatus sends the pod's status to the apiserver when it changed.
func (w *worker) pushStatus(ctx context.Context) {
	st := w.computeStatus()
	raw, err := json.Marshal(st)
	if err != nil {
		return
	}
	if bytes.Equal(raw, w.lastPush) {
		return
	}
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": w.uid},
		"status":   st,
	})
	if err != nil {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = w.a.client.CoreV1().Pods(w.namespace).Patch(pctx, w.name, types.MergePatchType, patch, metav1.PatchOptions{}, "status")
	if err != nil {
		if !apierrors.IsNotFound(err) && ctx.Err() == nil {
			w.log.Warn("update pod status", zap.Error(err))
		}
		return
	}
	w.lastPush = raw
}
