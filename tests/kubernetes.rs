//! deploy/kubernetes/: there is no cluster on the CI machine, so the example is kept honest
//! here. Every document of every `*.yaml` parses; the `sluice.toml` of the ConfigMap passes
//! the real `sluice check`, and the real binary runs it with the Deployment's arguments and
//! environment (on loopback, with the memory store); and the files agree with each other and
//! with sluice: Service selectors and target ports with the Deployments, container ports with
//! `[listen]`, the probes with the admin listener, the config mount with `SLUICE_CONFIG`, the
//! name sluice resolves and the Redis URL with their Services, the `ScaledObject` with the
//! model server's Deployment, and the metrics its query names with sluice's `/metrics`.
//!
//! The files are found by what they hold, not by their names: the sluice Deployment is the one
//! that sets `SLUICE_CONFIG`, the model server the one behind the Service that `sluice.toml`
//! resolves, Redis the one behind the Service its `[store] url` names.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice::config::{Backend, Config, Resolve, StoreConfig};
use support::process::{check, start_binary_with_env, write_config};
use support::{get, once};
use yaml_rust2::{Yaml, YamlLoader};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// One Kubernetes object: the file it is in and its document.
struct Object {
    file: String,
    doc: Yaml,
}

impl Object {
    fn kind(&self) -> &str {
        text(&self.doc["kind"], "kind")
    }

    fn name(&self) -> &str {
        text(&self.doc["metadata"]["name"], "metadata.name")
    }

    fn namespace(&self) -> Option<&str> {
        self.doc["metadata"]["namespace"].as_str()
    }

    /// `Kind/name (file)`, for messages.
    fn id(&self) -> String {
        format!("{}/{} ({})", self.kind(), self.name(), self.file)
    }

    /// The pod template's spec (Deployments).
    fn pod_spec(&self) -> &Yaml {
        &self.doc["spec"]["template"]["spec"]
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        string_map(&self.doc["spec"]["template"]["metadata"]["labels"])
    }

    fn containers(&self) -> &[Yaml] {
        list(&self.pod_spec()["containers"])
    }
}

/// Every object of deploy/kubernetes/*.yaml, files in the order `kubectl apply -f` takes them
/// (lexical), documents in file order.
struct Manifests {
    files: Vec<String>,
    objects: Vec<Object>,
}

impl Manifests {
    fn load() -> Self {
        let mut files: Vec<String> = std::fs::read_dir(dir())
            .expect("read deploy/kubernetes/")
            .map(|e| e.expect("a directory entry").file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .collect();
        files.sort();
        let mut objects = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(dir().join(file)).unwrap();
            let docs = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("deploy/kubernetes/{file}: not YAML: {e}"));
            for doc in docs {
                if doc.is_null() {
                    continue; // an empty document (a `---` with nothing after it)
                }
                assert!(doc.is_hash(), "{file}: a document that is not a mapping");
                objects.push(Object {
                    file: file.clone(),
                    doc,
                });
            }
        }
        Self { files, objects }
    }

    fn of_kind(&self, kind: &'static str) -> impl Iterator<Item = &Object> {
        self.objects.iter().filter(move |o| o.kind() == kind)
    }

    /// The object of `kind` named `name` in `namespace`.
    fn find(&self, kind: &'static str, namespace: &str, name: &str) -> &Object {
        self.of_kind(kind)
            .find(|o| o.name() == name && o.namespace() == Some(namespace))
            .unwrap_or_else(|| panic!("no {kind} {name:?} in namespace {namespace:?}"))
    }

    /// The one Deployment whose pods `service` selects (and every one it selects, checked to
    /// be exactly one).
    fn selected(&self, service: &Object) -> &Object {
        let selector = string_map(&service.doc["spec"]["selector"]);
        assert!(!selector.is_empty(), "{}: no selector", service.id());
        let matched: Vec<&Object> = self
            .of_kind("Deployment")
            .filter(|d| d.namespace() == service.namespace())
            .filter(|d| {
                let labels = d.pod_labels();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        assert_eq!(
            matched.len(),
            1,
            "{}: its selector {selector:?} matches the pods of {:?}",
            service.id(),
            matched.iter().map(|d| d.id()).collect::<Vec<_>>()
        );
        matched[0]
    }
}

fn text<'y>(y: &'y Yaml, what: &str) -> &'y str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {y:?}"))
}

fn int(y: &Yaml, what: &str) -> i64 {
    y.as_i64()
        .unwrap_or_else(|| panic!("{what}: not an integer: {y:?}"))
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

/// A mapping of strings (labels, a selector); empty when absent.
fn string_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (text(k, "a key").to_owned(), text(v, "a value").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The container port `port` (a number, or the name of one of `containers`' ports) stands
/// for.
fn container_port(containers: &[Yaml], port: &Yaml) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = text(port, "a port");
    containers
        .iter()
        .flat_map(|c| list(&c["ports"]))
        .find(|p| p["name"].as_str() == Some(name))
        .map(|p| int(&p["containerPort"], "containerPort"))
        .unwrap_or_else(|| panic!("no container port is named {name:?}"))
}

/// The container port a Service port's `targetPort` (default: its `port`) reaches.
fn target_port(service_port: &Yaml, deployment: &Object) -> i64 {
    let target = match &service_port["targetPort"] {
        Yaml::BadValue => &service_port["port"],
        t => t,
    };
    container_port(deployment.containers(), target)
}

fn declared_ports(containers: &[Yaml]) -> BTreeSet<i64> {
    containers
        .iter()
        .flat_map(|c| list(&c["ports"]))
        .map(|p| int(&p["containerPort"], "containerPort"))
        .collect()
}

/// A name a pod's resolver finds `service` in `namespace` by, from the client's namespace
/// `home`: `svc`, `svc.ns`, `svc.ns.svc` or `svc.ns.svc.cluster.local`; the Service's name
/// and namespace.
fn service_of_host<'h>(host: &'h str, home: &'h str) -> (&'h str, &'h str) {
    let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    let full = ["", "", "svc", "cluster", "local"];
    assert!(
        labels.len() <= full.len() && labels.len() != 4,
        "{host:?} is not <service>[.<namespace>[.svc[.cluster.local]]]"
    );
    for (i, label) in labels.iter().enumerate().skip(2) {
        assert_eq!(*label, full[i], "{host:?}: a Service's name in cluster DNS");
    }
    (labels[0], labels.get(1).copied().unwrap_or(home))
}

/// The sluice Deployment and what it runs: the container that sets `SLUICE_CONFIG`, the
/// ConfigMap mounted at that file's directory, and the `sluice.toml` in it.
struct SluiceDeployment<'m> {
    deployment: &'m Object,
    container: &'m Yaml,
    /// `SLUICE_CONFIG`
    config_path: String,
    /// The file's text, from the ConfigMap.
    toml: String,
    config: Config,
}

impl<'m> SluiceDeployment<'m> {
    fn find(m: &'m Manifests) -> Self {
        let found: Vec<(&Object, &Yaml, String)> = m
            .of_kind("Deployment")
            .flat_map(|d| d.containers().iter().map(move |c| (d, c)))
            .filter_map(|(d, c)| Some((d, c, env_value(c, "SLUICE_CONFIG")?)))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one container sets SLUICE_CONFIG (the sluice Deployment)"
        );
        let (deployment, container, config_path) = found.into_iter().next().unwrap();
        let id = deployment.id();
        let path = Path::new(&config_path);
        let (config_dir, file) = (
            path.parent().unwrap().to_str().unwrap(),
            path.file_name().unwrap().to_str().unwrap(),
        );
        // The ConfigMap is mounted as the directory of SLUICE_CONFIG (no subPath: a subPath
        // mount never sees an edit of the ConfigMap), read-only.
        let mount = list(&container["volumeMounts"])
            .iter()
            .find(|v| v["mountPath"].as_str() == Some(config_dir))
            .unwrap_or_else(|| panic!("{id}: nothing is mounted at {config_dir}"));
        assert!(
            mount["subPath"].is_badvalue(),
            "{id}: mount the directory, not a subPath"
        );
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{id}: read-only");
        let volume_name = text(&mount["name"], "volumeMounts[].name");
        let volume = list(&deployment.pod_spec()["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(volume_name))
            .unwrap_or_else(|| panic!("{id}: no volume {volume_name:?}"));
        let map_name = text(&volume["configMap"]["name"], "the volume's configMap.name");
        let namespace = deployment.namespace().unwrap();
        let map = m.find("ConfigMap", namespace, map_name);
        let toml = text(
            &map.doc["data"][file],
            &format!("{}: data.{file}", map.id()),
        )
        .to_owned();
        let config = Config::parse(&toml)
            .unwrap_or_else(|e| panic!("{}: data.{file} is not a sluice config: {e}", map.id()));
        Self {
            deployment,
            container,
            config_path,
            toml,
            config,
        }
    }

    fn id(&self) -> String {
        self.deployment.id()
    }

    fn namespace(&self) -> &str {
        self.deployment.namespace().unwrap()
    }

    /// The container port a probe asks, and its path.
    fn probe(&self, which: &str) -> (i64, String) {
        let get = &self.container[which]["httpGet"];
        assert!(!get.is_badvalue(), "{}: no {which} httpGet", self.id());
        let port = container_port(self.deployment.containers(), &get["port"]);
        (port, text(&get["path"], "httpGet.path").to_owned())
    }
}

/// The literal value of environment variable `name` in `container`.
fn env_value(container: &Yaml, name: &str) -> Option<String> {
    list(&container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

fn port_of(addr: &str) -> (std::net::SocketAddr, i64) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    (addr, i64::from(addr.port()))
}

/// `(host, port)` of a `scheme://host[:port][/path]` URL.
fn host_port(url: &str) -> (String, Option<u16>) {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    (uri.host().unwrap().to_owned(), uri.port_u16())
}

#[test]
fn every_document_parses_and_lives_in_one_namespace() {
    let m = Manifests::load();
    assert!(m.files.len() >= 4, "files: {:?}", m.files);
    let mut seen = BTreeSet::new();
    for o in &m.objects {
        assert!(
            o.doc["apiVersion"].as_str().is_some(),
            "{}: no apiVersion",
            o.id()
        );
        assert!(
            seen.insert((o.kind().to_owned(), o.name().to_owned())),
            "{}: twice",
            o.id()
        );
    }
    let namespaces: Vec<&Object> = m.of_kind("Namespace").collect();
    assert_eq!(namespaces.len(), 1, "one Namespace");
    let ns = namespaces[0];
    for o in m.objects.iter().filter(|o| o.kind() != "Namespace") {
        assert_eq!(
            o.namespace(),
            Some(ns.name()),
            "{}: set metadata.namespace to {:?}",
            o.id(),
            ns.name()
        );
    }
    // `kubectl apply -f deploy/kubernetes/` takes the files in lexical order: the namespace
    // must exist before the first object that goes into it.
    assert_eq!(
        m.files.first().map(String::as_str),
        Some(ns.file.as_str()),
        "the Namespace's file sorts first: {:?}",
        m.files
    );
    // The README says what each file is.
    let readme = std::fs::read_to_string(dir().join("README.md")).expect("a README.md");
    for file in &m.files {
        assert!(
            readme.contains(&format!("`{file}`")),
            "README.md does not describe {file}"
        );
    }
    assert!(readme.contains("kubectl apply -f deploy/kubernetes/"));
}

#[test]
fn the_configmap_config_passes_sluice_check() {
    let m = Manifests::load();
    let sluice = SluiceDeployment::find(&m);
    let path = write_config("kubernetes", &sluice.toml);
    let output = check(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "sluice check on the ConfigMap's sluice.toml: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(": ok: "), "{stdout}");
    assert!(
        stdout.contains("name(s) to look up in DNS"),
        "the model server is found by DNS: {stdout}"
    );
    Config::load(&path).expect("valid");
}

#[test]
fn services_select_one_deployment_and_reach_its_container_ports() {
    let m = Manifests::load();
    let services: Vec<&Object> = m.of_kind("Service").collect();
    assert!(!services.is_empty());
    for service in services {
        let deployment = m.selected(service);
        let match_labels = string_map(&deployment.doc["spec"]["selector"]["matchLabels"]);
        let labels = deployment.pod_labels();
        assert!(
            !match_labels.is_empty() && match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{}: spec.selector {match_labels:?} must match its pod labels {labels:?}",
            deployment.id()
        );
        let declared = declared_ports(deployment.containers());
        let ports = list(&service.doc["spec"]["ports"]);
        assert!(!ports.is_empty(), "{}: no ports", service.id());
        for port in ports {
            let target = target_port(port, deployment);
            assert!(
                declared.contains(&target),
                "{}: port {:?} reaches {target}, which {} does not declare ({declared:?})",
                service.id(),
                port["name"],
                deployment.id()
            );
        }
    }
}

#[test]
fn sluice_listens_where_its_deployment_says() {
    let m = Manifests::load();
    let sluice = SluiceDeployment::find(&m);
    let id = sluice.id();
    let declared = declared_ports(sluice.deployment.containers());

    // The listeners are on every address of the pod, at declared container ports.
    let (proxy, proxy_port) = port_of(&sluice.config.listen.proxy);
    let (admin, admin_port) = port_of(&sluice.config.listen.admin);
    for (what, addr, port) in [("proxy", proxy, proxy_port), ("admin", admin, admin_port)] {
        assert!(
            addr.ip().is_unspecified(),
            "[listen] {what} = {addr}: not reachable from outside the pod"
        );
        assert!(
            declared.contains(&port),
            "{id}: [listen] {what} port {port} is not a containerPort ({declared:?})"
        );
    }

    // The probes ask the admin listener: /readyz for readiness, /healthz for liveness.
    assert_eq!(
        sluice.probe("readinessProbe"),
        (admin_port, "/readyz".to_owned()),
        "{id}: readinessProbe"
    );
    assert_eq!(
        sluice.probe("livenessProbe"),
        (admin_port, "/healthz".to_owned()),
        "{id}: livenessProbe"
    );

    // Clients reach the proxy port through a Service, Prometheus the admin port.
    let targets: BTreeSet<i64> = m
        .of_kind("Service")
        .filter(|s| std::ptr::eq(m.selected(s), sluice.deployment))
        .flat_map(|s| {
            list(&s.doc["spec"]["ports"])
                .iter()
                .map(|p| target_port(p, sluice.deployment))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        targets.contains(&proxy_port) && targets.contains(&admin_port),
        "Services of {id} reach {targets:?}, not both {proxy_port} and {admin_port}"
    );
    for service in m.of_kind("Service") {
        let annotations = string_map(&service.doc["metadata"]["annotations"]);
        if let Some(port) = annotations.get("prometheus.io/port") {
            assert_eq!(
                port,
                &admin_port.to_string(),
                "{}: scrape port",
                service.id()
            );
        }
    }

    // The admin API listens beyond loopback: it needs the token, from a Secret that the
    // README tells how to create (or that a manifest defines).
    let token = list(&sluice.container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some("SLUICE_ADMIN_TOKEN"))
        .unwrap_or_else(|| panic!("{id}: admin on {admin} without SLUICE_ADMIN_TOKEN"));
    let secret = &token["valueFrom"]["secretKeyRef"];
    let (secret_name, key) = (
        text(&secret["name"], "secretKeyRef.name"),
        text(&secret["key"], "secretKeyRef.key"),
    );
    let readme = std::fs::read_to_string(dir().join("README.md")).unwrap();
    let created = readme.contains(&format!(
        "kubectl -n {} create secret generic {secret_name} --from-literal={key}=",
        sluice.namespace()
    ));
    let defined = m
        .of_kind("Secret")
        .any(|s| s.name() == secret_name && !s.doc["stringData"][key].is_badvalue());
    assert!(
        created || defined,
        "{id}: the Secret {secret_name:?} (key {key:?}) is neither defined nor created in README.md"
    );

    // It runs `run` on the file SLUICE_CONFIG names (the image's entrypoint is `sluice`, its
    // default command `demo`).
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    assert!(
        sluice.container["command"].is_badvalue(),
        "{id}: keep the image's entrypoint"
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"sluice\"]"));
    let args: Vec<&str> = list(&sluice.container["args"])
        .iter()
        .map(|a| text(a, "args[]"))
        .collect();
    assert_eq!(args.first(), Some(&"run"), "{id}: args {args:?}");
    if let Some(i) = args.iter().position(|a| *a == "--config") {
        assert_eq!(args.get(i + 1).copied(), Some(sluice.config_path.as_str()));
    }

    // A fleet: several replicas, which then must share their limits through the store (each
    // would enforce whole limits alone otherwise).
    let replicas = int(&sluice.deployment.doc["spec"]["replicas"], "replicas");
    assert!(replicas >= 2, "{id}: {replicas} replica(s)");
    assert_eq!(sluice.config.store.backend, Backend::Redis, "{id}: [store]");

    // Non-root as the image's user, on a read-only file system.
    let uid: i64 = dockerfile
        .lines()
        .find(|l| l.contains("useradd"))
        .and_then(|l| l.split("--uid ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the Dockerfile's useradd --uid");
    let pod_security = &sluice.deployment.pod_spec()["securityContext"];
    let container_security = &sluice.container["securityContext"];
    let setting = |key: &str| match &container_security[key] {
        Yaml::BadValue => &pod_security[key],
        v => v,
    };
    assert_eq!(
        setting("runAsNonRoot").as_bool(),
        Some(true),
        "{id}: runAsNonRoot"
    );
    assert_eq!(
        setting("runAsUser").as_i64(),
        Some(uid),
        "{id}: the image's uid"
    );
    assert_eq!(
        container_security["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{id}: readOnlyRootFilesystem"
    );

    // Stopping: the preStop pause and sluice's drain both end before the kubelet's SIGKILL.
    let grace = sluice.deployment.pod_spec()["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(30);
    let pause = pre_stop_pause(sluice.container);
    let drain = sluice.config.timeouts.shutdown_grace.as_secs_f64().ceil() as i64;
    assert!(
        pause + drain <= grace,
        "{id}: preStop {pause} s + shutdown_grace {drain} s > terminationGracePeriodSeconds {grace}"
    );
}

/// Seconds a container's preStop hook waits (`sleep N`, or the kubelet's `sleep` action).
fn pre_stop_pause(container: &Yaml) -> i64 {
    let pre_stop = &container["lifecycle"]["preStop"];
    match (&pre_stop["exec"]["command"], &pre_stop["sleep"]["seconds"]) {
        (Yaml::Array(command), _) if command.first().and_then(Yaml::as_str) == Some("sleep") => {
            text(&command[1], "sleep's argument")
                .parse::<i64>()
                .unwrap()
        }
        (_, Yaml::Integer(seconds)) => *seconds,
        _ => 0,
    }
}

/// The headless Service `sluice.toml` resolves, and the model server Deployment behind it.
fn model_server<'m>(m: &'m Manifests, sluice: &SluiceDeployment) -> (&'m Object, &'m Object) {
    let entries: Vec<(String, Resolve)> = sluice
        .config
        .services
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| !e.resolve().is_off())
        .map(|e| (e.url().to_owned(), e.resolve()))
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one endpoint entry resolved by DNS: {entries:?}"
    );
    let (url, how) = &entries[0];
    let (host, url_port) = host_port(url);
    let (host, port_name) = match how {
        Resolve::Srv => {
            // _<port name>._tcp.<service name>
            let mut parts = host.splitn(3, '.');
            let name = parts
                .next()
                .unwrap()
                .strip_prefix('_')
                .expect("_port._proto.");
            assert_eq!(parts.next(), Some("_tcp"), "{url}");
            (parts.next().unwrap().to_owned(), Some(name.to_owned()))
        }
        _ => (host, None),
    };
    let (name, namespace) = service_of_host(&host, sluice.namespace());
    let service = m.find("Service", namespace, name);
    assert_eq!(
        service.doc["spec"]["clusterIP"].as_str(),
        Some("None"),
        "{}: resolve needs a headless Service: a ClusterIP Service's name is one virtual IP, \
         one endpoint for every pod",
        service.id()
    );
    let deployment = m.selected(service);
    // sluice connects to each pod's address at the URL's port (A/AAAA) or the SRV record's
    // (the named port's): the Service's port and the container's must both be it.
    let ports = list(&service.doc["spec"]["ports"]);
    let port = match (url_port, port_name) {
        (Some(p), None) => ports
            .iter()
            .find(|sp| sp["port"].as_i64() == Some(i64::from(p)))
            .unwrap_or_else(|| panic!("{}: no port {p} (the port of {url})", service.id())),
        (None, Some(name)) => ports
            .iter()
            .find(|sp| sp["name"].as_str() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{}: no port named {name:?} ({url})", service.id())),
        _ => panic!("{url}: a port with resolve = true, none with \"srv\""),
    };
    assert_eq!(
        Some(target_port(port, deployment)),
        port["port"].as_i64(),
        "{}: sluice reaches the pods at the Service's port: make targetPort the same",
        service.id()
    );
    (service, deployment)
}

#[test]
fn sluice_resolves_a_headless_service_of_the_model_server() {
    let m = Manifests::load();
    let sluice = SluiceDeployment::find(&m);
    let (_, model) = model_server(&m, &sluice);
    // sluice's health check asks the path the kubelet's readiness probe asks.
    let readiness: Vec<&str> = model
        .containers()
        .iter()
        .filter_map(|c| c["readinessProbe"]["httpGet"]["path"].as_str())
        .collect();
    assert!(!readiness.is_empty(), "{}: no readinessProbe", model.id());
    // A stopping pod leaves the DNS answer at once; sluice learns it at its next lookup, at
    // most max_ttl later, and may send it new requests until then.
    let max_ttl = sluice.config.resolver.max_ttl.as_secs_f64().ceil() as i64;
    for container in model.containers() {
        let pause = pre_stop_pause(container);
        assert!(
            pause >= max_ttl,
            "{}: preStop pause {pause} s < [resolver] max_ttl {max_ttl} s",
            model.id()
        );
    }
    for service in &sluice.config.services {
        let health = service
            .health
            .as_ref()
            .unwrap_or_else(|| panic!("service {}: no [service.health]", service.name));
        assert!(
            readiness.contains(&health.path.as_str()),
            "service {}: [service.health] path {} is not {}'s readiness path {readiness:?}",
            service.name,
            health.path,
            model.id()
        );
        assert!(
            service.slow_start.is_some(),
            "service {}: slow_start",
            service.name
        );
        assert!(service.queue_size > 0, "service {}: a queue", service.name);
    }
}

#[test]
fn the_store_url_names_the_redis_service() {
    let m = Manifests::load();
    let sluice = SluiceDeployment::find(&m);
    let url = &sluice.config.store.url;
    assert!(url.starts_with("redis://"), "{url}");
    let (host, port) = host_port(url);
    let (name, namespace) = service_of_host(&host, sluice.namespace());
    let service = m.find("Service", namespace, name);
    let port = i64::from(port.unwrap_or(6379));
    let service_port = list(&service.doc["spec"]["ports"])
        .iter()
        .find(|p| p["port"].as_i64() == Some(port))
        .unwrap_or_else(|| panic!("{}: no port {port} (from {url})", service.id()));
    let redis = m.selected(service);
    let target = target_port(service_port, redis);
    let container = redis
        .containers()
        .iter()
        .find(|c| declared_ports(std::slice::from_ref(*c)).contains(&target))
        .unwrap();
    assert!(
        text(&container["image"], "image").starts_with("redis:"),
        "{}: {url} reaches {}, not Redis",
        service.id(),
        redis.id()
    );
}

#[test]
fn the_scaled_object_scales_the_model_server_within_what_sluice_can_use() {
    let m = Manifests::load();
    let sluice = SluiceDeployment::find(&m);
    let (_, model) = model_server(&m, &sluice);
    let scaled: Vec<&Object> = m.of_kind("ScaledObject").collect();
    assert_eq!(scaled.len(), 1, "one ScaledObject");
    let scaled = scaled[0];
    let id = scaled.id();
    let spec = &scaled.doc["spec"];
    let target = &spec["scaleTargetRef"];
    assert_eq!(
        (
            target["kind"].as_str().unwrap_or("Deployment"),
            text(&target["name"], "scaleTargetRef.name")
        ),
        ("Deployment", model.name()),
        "{id}: scales the Deployment behind the Service sluice resolves"
    );
    assert_eq!(scaled.namespace(), model.namespace());

    // One name brings at most max_endpoints endpoints: pods beyond would get no traffic.
    let max = int(&spec["maxReplicaCount"], "maxReplicaCount");
    assert!(
        max <= i64::from(sluice.config.resolver.max_endpoints),
        "{id}: maxReplicaCount {max} > [resolver] max_endpoints {}",
        sluice.config.resolver.max_endpoints
    );
    // Scaled to zero, only requests that wait in sluice's queue can wake the model server
    // (sluice stays ready then: its_binary_serves_the_probes_and_the_metrics_the_query_names).
    let min = spec["minReplicaCount"].as_i64().unwrap_or(0);
    if min == 0 {
        let (_, service, _) = trigger(scaled);
        let queue = sluice
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .map_or(0, |s| s.queue_size);
        assert!(
            queue > 0,
            "{id}: minReplicaCount 0 and no queue in service {service:?}: nothing waits to wake it"
        );
    }

    // The target per pod is the cap sluice holds each pod to: full pods with nobody waiting
    // keep their number.
    let (trigger, service, _) = trigger(scaled);
    let threshold: f64 = text(&trigger["metadata"]["threshold"], "threshold")
        .parse()
        .unwrap();
    let config = sluice
        .config
        .services
        .iter()
        .find(|s| s.name == service)
        .unwrap_or_else(|| panic!("{id}: the query's service {service:?} is not in sluice.toml"));
    let resolved = config
        .endpoints
        .iter()
        .position(|e| !e.resolve().is_off())
        .expect("the resolved entry");
    assert_eq!(
        threshold,
        f64::from(config.endpoint_cap(resolved).fixed().expect("a fixed cap")),
        "{id}: threshold is the per-pod cap (max_concurrent) of service {service:?}"
    );
}

/// A metric name with labels: a selector of a query (its `label="value"` matchers), or a
/// sample of a scrape.
type Series = (String, BTreeMap<String, String>);

/// The ScaledObject's Prometheus trigger, the `service` its query names, and the metric
/// selectors in the query (name and `label="value"` matchers).
fn trigger(scaled: &Object) -> (&Yaml, String, Vec<Series>) {
    let triggers = list(&scaled.doc["spec"]["triggers"]);
    let trigger = triggers
        .iter()
        .find(|t| t["type"].as_str() == Some("prometheus"))
        .unwrap_or_else(|| panic!("{}: no prometheus trigger", scaled.id()));
    let query = text(&trigger["metadata"]["query"], "query");
    let selectors = selectors(query);
    assert!(!selectors.is_empty(), "{query}: names no sluice metric");
    let services: BTreeSet<&String> = selectors
        .iter()
        .filter_map(|(_, l)| l.get("service"))
        .collect();
    assert_eq!(
        services.len(),
        1,
        "{query}: every selector names the same service"
    );
    assert!(
        selectors.iter().all(|(_, l)| l.contains_key("service")),
        "{query}: a selector without a service label sums every service"
    );
    let service = services.into_iter().next().unwrap().clone();
    (trigger, service, selectors)
}

/// `sluice_*` metric names in a PromQL query, each with its `label="value"` matchers.
fn selectors(query: &str) -> Vec<Series> {
    let mut found = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("sluice_") {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..end].to_owned();
        rest = &rest[end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner.find('}').expect("a closing brace");
            for matcher in inner[..close].split(',').filter(|m| !m.trim().is_empty()) {
                let (key, value) = matcher
                    .split_once('=')
                    .unwrap_or_else(|| panic!("matcher {matcher:?}"));
                assert!(
                    !key.ends_with('!') && !value.starts_with('~'),
                    "only = matchers are checked here: {matcher:?}"
                );
                labels.insert(
                    key.trim().to_owned(),
                    value.trim().trim_matches('"').to_owned(),
                );
            }
            rest = &inner[close + 1..];
        }
        found.push((name, labels));
    }
    found
}

/// The families (`# TYPE`) of a text-format scrape and its samples' names and labels.
fn scrape(text: &str) -> (BTreeSet<String>, Vec<Series>) {
    let mut families = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let mut labels = BTreeMap::new();
        if let Some(inner) = line[name_end..].strip_prefix('{') {
            // Values are config names and URLs here: no `"` or `,` inside them.
            let close = inner.rfind('}').unwrap();
            for pair in inner[..close].split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        }
        samples.push((line[..name_end].to_owned(), labels));
    }
    (families, samples)
}

/// The ConfigMap's sluice.toml, made runnable here: listeners on loopback, the memory store,
/// and DNS asked of a closed port on loopback (so the cluster name is not sent to this
/// machine's resolver; the lookup fails and the service has no endpoint).
fn runnable_here(config: &Config) -> String {
    let mut config = config.clone();
    config.listen.proxy = "127.0.0.1:0".into();
    config.listen.admin = "127.0.0.1:0".into();
    config.store = StoreConfig::default();
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    config.resolver.nameservers = vec![closed.to_string()];
    config.resolver.timeout = Duration::from_millis(200);
    toml::to_string(&config).expect("the config serializes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_binary_serves_the_probes_and_the_metrics_the_query_names() {
    let m = Manifests::load();
    let sluice = SluiceDeployment::find(&m);
    let path = write_config("kubernetes-run", &runnable_here(&sluice.config));
    // The Deployment's arguments, with SLUICE_CONFIG pointing at the file instead of
    // `--config`, as in the pod.
    let args: Vec<&str> = list(&sluice.container["args"])
        .iter()
        .map(|a| text(a, "args[]"))
        .collect();
    let path_text = path.to_str().unwrap();
    let mut process = start_binary_with_env(
        &args,
        &[
            ("SLUICE_CONFIG", path_text),
            ("SLUICE_ADMIN_TOKEN", "test-token"),
        ],
    )
    .await;
    let admin = process.admin.expect("the admin listener");

    // The probes' paths answer on the admin listener (probe() checked the port is it).
    let (_, live) = sluice.probe("livenessProbe");
    let answer = once(admin, get(admin, &live)).await;
    assert_eq!(answer.status, 200, "{live}: {}", answer.text());
    let (_, ready) = sluice.probe("readinessProbe");
    let answer = once(admin, get(admin, &ready)).await;
    // No model-server pod found: still ready (degraded, saying why), so the Service keeps
    // sending requests to queue while the model server scales from zero.
    assert_eq!(answer.status, 200, "{ready}: {}", answer.text());
    assert_eq!(answer.json()["status"], "degraded", "{}", answer.text());
    assert!(
        answer.text().contains("has no endpoints"),
        "{ready}: {}",
        answer.text()
    );

    // Every metric the ScaledObject's query names is a family of /metrics, with a series for
    // its labels.
    let answer = once(admin, get(admin, "/metrics")).await;
    assert_eq!(answer.status, 200);
    let (families, samples) = scrape(&answer.text());
    for scaled in m.of_kind("ScaledObject") {
        let (_, _, selectors) = trigger(scaled);
        for (name, labels) in selectors {
            assert!(
                families.contains(&name),
                "{}: {name} is not a metric of sluice's /metrics",
                scaled.id()
            );
            assert!(
                samples
                    .iter()
                    .any(|(n, l)| *n == name && labels.iter().all(|(k, v)| l.get(k) == Some(v))),
                "{}: /metrics has no {name} series with {labels:?}",
                scaled.id()
            );
        }
    }
    process.signal("TERM");
    let status = process.wait_exit(support::DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[test]
fn the_query_reader_finds_selectors() {
    let found = selectors(
        "sum(sluice_queue_length{service=\"scoring\"}) + sum(rate(sluice_requests_total{service=\"a\", reason=\"no_endpoints\"}[1m])) / sluice_x",
    );
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["sluice_queue_length", "sluice_requests_total", "sluice_x"]
    );
    assert_eq!(found[1].1["reason"], "no_endpoints");
    assert_eq!(found[1].1["service"], "a");
    assert!(found[2].1.is_empty());
    assert_eq!(service_of_host("redis", "ml"), ("redis", "ml"));
    assert_eq!(
        service_of_host("redis.cache.svc.cluster.local", "ml"),
        ("redis", "cache")
    );
}
