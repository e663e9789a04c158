// oci-defaults prints what containerd gives a Kubernetes container before the pod's own
// settings, as JSON, so that tests/runc_pod.py can run a pod spec in runc the way
// containerd's CRI plugin would:
//
//	oci-defaults spec                 containerd's default OCI spec (capabilities,
//	                                  masked and read-only paths, mounts, namespaces)
//	oci-defaults seccomp CAP_X ...    containerd's RuntimeDefault seccomp profile for a
//	                                  container with exactly these capabilities (the
//	                                  profile allows more calls to one with CAP_SYS_ADMIN)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: oci-defaults spec | seccomp CAP_X ...")
		os.Exit(2)
	}
	var out any
	switch os.Args[1] {
	case "spec":
		ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
		spec, err := oci.GenerateSpec(ctx, nil, &containers.Container{ID: "gristmill"})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out = spec
	case "seccomp":
		caps := append([]string{}, os.Args[2:]...)
		spec := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{
			Bounding: caps, Effective: caps, Permitted: caps}}}
		out = seccomp.DefaultProfile(spec)
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
