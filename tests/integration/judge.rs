//! Judging, for real: programs in every built-in language compiled and judged against
//! test cases, every verdict produced by a program written to earn it; several files;
//! compare modes; stop on failure; the compile cache (a hit, an eviction); a compile step
//! that plants links for the host to follow; bad judging input.

use crate::common::{Server, DEADLINE};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Programs reading two integers and printing their sum, and programs earning each other
/// verdict, per language.
struct Programs {
    language: &'static str,
    ok: &'static str,
    wrong: &'static str,
    loops: &'static str,
    hog: &'static str,
    crash: &'static str,
    flood: &'static str,
    syntax: &'static str,
}

fn programs() -> Vec<Programs> {
    vec![
        Programs {
            language: "c",
            ok: "#include <stdio.h>\nint main(){int a,b;scanf(\"%d %d\",&a,&b);printf(\"%d\\n\",a+b);return 0;}\n",
            wrong: "#include <stdio.h>\nint main(){int a,b;scanf(\"%d %d\",&a,&b);printf(\"%d\\n\",a+b+1);return 0;}\n",
            loops: "int main(){for(;;);}\n",
            hog: "#include <stdlib.h>\n#include <string.h>\nint main(){for(;;){char*p=malloc(1<<20);memset(p,1,1<<20);}}\n",
            crash: "int main(){volatile int *p=0;*p=1;return 0;}\n",
            flood: "#include <stdio.h>\nint main(){for(int i=0;i<100000;i++)putchar('x');return 0;}\n",
            syntax: "int main( { return 0 }\n",
        },
        Programs {
            language: "cpp",
            ok: "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<std::endl;}\n",
            wrong: "#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a-b<<std::endl;}\n",
            loops: "int main(){for(;;){}}\n",
            hog: "#include <vector>\n#include <cstring>\nint main(){std::vector<char*> v;for(;;){char*p=new char[1<<20];std::memset(p,1,1<<20);v.push_back(p);}}\n",
            crash: "#include <stdexcept>\nint main(){throw std::runtime_error(\"boom\");}\n",
            flood: "#include <iostream>\n#include <string>\nint main(){std::cout<<std::string(100000,'x');}\n",
            syntax: "int main() { return }\n",
        },
        Programs {
            language: "java",
            ok: "import java.util.*;\npublic class Main{public static void main(String[] x){Scanner s=new Scanner(System.in);long a=s.nextLong(),b=s.nextLong();System.out.println(a+b);}}\n",
            wrong: "import java.util.*;\npublic class Main{public static void main(String[] x){Scanner s=new Scanner(System.in);long a=s.nextLong(),b=s.nextLong();System.out.println(a*b);}}\n",
            loops: "public class Main{public static void main(String[] x){while(true){}}}\n",
            hog: "import java.util.*;\npublic class Main{public static void main(String[] x){List<long[]> l=new ArrayList<>();while(true){long[] a=new long[1<<17];Arrays.fill(a,1);l.add(a);}}}\n",
            crash: "public class Main{public static void main(String[] x){throw new RuntimeException(\"boom\");}}\n",
            flood: "public class Main{public static void main(String[] x){System.out.print(\"x\".repeat(100000));}}\n",
            syntax: "public class Main{ void main( }\n",
        },
        Programs {
            language: "javascript",
            ok: "const [a,b]=require('fs').readFileSync(0,'utf8').trim().split(/\\s+/).map(Number);console.log(a+b);\n",
            wrong: "console.log(0);\n",
            loops: "for(;;){}\n",
            hog: "const a=[];for(;;)a.push(Buffer.alloc(1<<20,1));\n",
            crash: "throw new Error('boom');\n",
            flood: "process.stdout.write('x'.repeat(100000));\n",
            syntax: "function ( {\n",
        },
        Programs {
            language: "go",
            ok: "package main\nimport \"fmt\"\nfunc main(){var a,b int;fmt.Scan(&a,&b);fmt.Println(a+b)}\n",
            wrong: "package main\nimport \"fmt\"\nfunc main(){fmt.Println(-1)}\n",
            loops: "package main\nfunc main(){for{}}\n",
            hog: "package main\nfunc main(){var s [][]byte;for{b:=make([]byte,1<<20);for i:=range b{b[i]=1};s=append(s,b)}}\n",
            crash: "package main\nfunc main(){var p *int;*p=1}\n",
            flood: "package main\nimport (\"fmt\";\"strings\")\nfunc main(){fmt.Print(strings.Repeat(\"x\",100000))}\n",
            syntax: "package main\nfunc main( {\n",
        },
        Programs {
            language: "rust",
            ok: "use std::io::Read;\nfn main(){let mut s=String::new();std::io::stdin().read_to_string(&mut s).unwrap();let v:Vec<i64>=s.split_whitespace().map(|x|x.parse().unwrap()).collect();println!(\"{}\",v[0]+v[1]);}\n",
            wrong: "fn main(){println!(\"4\");}\n",
            loops: "fn main(){loop{std::hint::black_box(0);}}\n",
            hog: "fn main(){let mut v=Vec::new();loop{v.push(vec![1u8;1<<20]);}}\n",
            crash: "fn main(){panic!(\"boom\");}\n",
            flood: "fn main(){print!(\"{}\",\"x\".repeat(100000));}\n",
            syntax: "fn main( {\n",
        },
        Programs {
            language: "python",
            ok: "a,b=map(int,input().split())\nprint(a+b)\n",
            wrong: "print(6)\n",
            loops: "while True: pass\n",
            hog: "x=[]\nwhile True: x.append(b'x'*(1<<20))\n",
            crash: "raise ValueError('boom')\n",
            flood: "print('x'*100000)\n",
            syntax: "def (:\n",
        },
    ]
}

fn compiled(language: &str) -> bool {
    !matches!(language, "python" | "javascript")
}

async fn judged(s: &Server, body: Value) -> Value {
    let id = s.submit(body).await;
    s.wait_terminal(&id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verdict_in_every_language() {
    let s = Server::start("workers = 2").await;
    let mut ids = Vec::new();
    for p in programs() {
        // The JVM needs more than the others; each gets its own default otherwise.
        let memory = if p.language == "java" { 384 } else { 128 };
        let cases = [
            ("ok", p.ok, "accepted"),
            ("wrong", p.wrong, "wrong_answer"),
            ("loops", p.loops, "time_limit"),
            ("hog", p.hog, "memory_limit"),
            ("crash", p.crash, "runtime_error"),
            ("flood", p.flood, "output_limit"),
            (
                "syntax",
                p.syntax,
                if compiled(p.language) {
                    "compile_error"
                } else {
                    "runtime_error"
                },
            ),
        ];
        for (what, code, want) in cases {
            let id = s
                .submit(json!({
                    "language": p.language,
                    "code": code,
                    "timeout": 3,
                    "limits": {"memory_mb": memory, "max_output_bytes": 4096},
                    "tests": [{"name": what, "stdin": "2 3\n", "expected_output": "5"}],
                }))
                .await;
            ids.push((p.language, what, want, id));
        }
    }
    let mut wrong = Vec::new();
    for (language, what, want, id) in ids {
        let r = s.wait_terminal(&id).await;
        let got = r["verdict"].as_str().unwrap_or("none").to_string();
        if got != want {
            wrong.push(format!(
                "{language}/{what}: {got} (want {want}); status {} {}; test {}; compile {}",
                r["status"], r["failure_reason"], r["tests"][0], r["compile"]
            ));
            continue;
        }
        if want == "compile_error" {
            assert_eq!(r["status"], "failed", "{r:#}");
            assert_eq!(r["failure_reason"], "compile_error", "{r:#}");
            assert_eq!(r["tests"][0]["verdict"], "skipped", "{r:#}");
            assert!(
                !r["compile"]["stderr"].as_str().unwrap_or("").is_empty(),
                "the compiler's message is kept: {r:#}"
            );
        } else {
            assert_eq!(r["status"], "completed", "{language}/{what}: {r:#}");
            assert_eq!(r["tests"][0]["verdict"], want);
            assert_eq!(r["score"]["total"], 1);
            assert_eq!(r["success"], want == "accepted", "{r:#}");
            if compiled(language) {
                assert!(r["compile"]["exit_code"] == 0, "{r:#}");
            } else {
                assert!(r["compile"].is_null(), "{r:#}");
            }
        }
    }
    assert!(wrong.is_empty(), "verdicts:\n{}", wrong.join("\n"));
    let accepted = s
        .metric("crucible_verdicts_total", "verdict=\"accepted\"")
        .await;
    assert_eq!(accepted, Some(7.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_files_args_and_clean_tests() {
    let s = Server::start("").await;
    // A C program with a header.
    let r = judged(
        &s,
        json!({
            "language": "c",
            "code": "#include <stdio.h>\n#include \"lib/sq.h\"\nint main(int c,char**v){int x;scanf(\"%d\",&x);printf(\"%d %s\\n\",sq(x),v[1]);}\n",
            "files": [{"name": "lib/sq.h", "content": "static int sq(int x){return x*x;}\n"}],
            "args": ["arg1"],
            "tests": [{"stdin": "7", "expected_output": "49 arg1"}],
        }),
    )
    .await;
    assert_eq!(r["verdict"], "accepted", "{r:#}");
    // A Python package of two modules; each test runs in a fresh sandbox (fresh /tmp).
    let r = judged(
        &s,
        json!({
            "code": "import os\nfrom pkg import mod\nprint(mod.twice(int(input())), os.path.exists('/tmp/seen'))\nopen('/tmp/seen','w').write('x')\n",
            "files": [
                {"name": "pkg/__init__.py", "content": ""},
                {"name": "pkg/mod.py", "content": "from .helper import one\ndef twice(x): return 2*x*one()\n"},
                {"name": "pkg/helper.py", "content": "def one(): return 1\n"},
            ],
            "tests": [
                {"stdin": "2", "expected_output": "4 False"},
                {"stdin": "3", "expected_output": "6 False"},
            ],
        }),
    )
    .await;
    assert_eq!(r["verdict"], "accepted", "{r:#}");
    assert_eq!(r["score"], json!({"passed": 2, "total": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_modes_and_stop_on_failure() {
    let s = Server::start("").await;
    let prints = "import sys\nsys.stdout.write(sys.stdin.read())\n";
    let case = |stdin: &str, expected: &str| json!({"stdin": stdin, "expected_output": expected});
    for (mode, tol, tests, want) in [
        (
            "exact",
            None,
            vec![case("1 2\n", "1 2\n"), case("1 2 \n", "1 2\n")],
            ["accepted", "wrong_answer"],
        ),
        (
            "trimmed",
            None,
            vec![case("1 2  \n\n\n", "1 2"), case(" 1 2", "1 2")],
            ["accepted", "wrong_answer"],
        ),
        (
            "tokens",
            None,
            vec![case("1\n 2\t3", "1 2 3"), case("1 2", "1 2 3")],
            ["accepted", "wrong_answer"],
        ),
        (
            "float",
            Some(1e-3),
            vec![case("3.1416 x", "3.14159 x"), case("3.15", "3.14159")],
            ["accepted", "wrong_answer"],
        ),
    ] {
        let mut body = json!({"code": prints, "compare": mode, "tests": tests});
        if let Some(t) = tol {
            body["float_tolerance"] = json!(t);
        }
        let r = judged(&s, body).await;
        let got: Vec<&str> = r["tests"]
            .as_array()
            .expect("tests")
            .iter()
            .map(|t| t["verdict"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(got, want, "{mode}: {r:#}");
        assert_eq!(r["verdict"], "wrong_answer");
        assert_eq!(r["score"], json!({"passed": 1, "total": 2}));
        assert_eq!(
            r["output"], r["tests"][1]["stdout"],
            "the first failure's output"
        );
    }
    let r = judged(
        &s,
        json!({"code": prints, "stop_on_failure": true,
               "tests": [case("a", "a"), case("b", "x"), case("c", "c")]}),
    )
    .await;
    let got: Vec<&str> = r["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| t["verdict"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(got, ["accepted", "wrong_answer", "skipped"], "{r:#}");
    assert!(
        r["tests"][2]["runtime_ms"].is_null(),
        "a skipped test did not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_an_event_per_judged_test() {
    let s = Server::start("").await;
    let id = s
        .submit(json!({"code": "print(input())",
                       "tests": [{"stdin": "a", "expected_output": "a"},
                                 {"stdin": "b", "expected_output": "b"},
                                 {"stdin": "c", "expected_output": "c"}]}))
        .await;
    s.wait_terminal(&id).await;
    let resp = s
        .client
        .stream(
            &format!("/api/events?eval_id={id}"),
            &[("Last-Event-ID", "0")],
        )
        .await
        .expect("stream");
    let mut reader = crucible::client::SseReader::new(resp);
    let mut kinds = Vec::new();
    let mut versions = Vec::new();
    let mut judged = Vec::new();
    while kinds.last().map(|k: &String| k.as_str()) != Some("evaluation:completed") {
        let ev = tokio::time::timeout(DEADLINE, reader.next())
            .await
            .expect("event")
            .expect("stream open");
        let v: Value = serde_json::from_str(&ev.data).expect("json");
        kinds.push(v["type"].as_str().unwrap_or("").to_string());
        versions.push(v["version"].as_u64().unwrap_or(0));
        let n = v["data"]["tests"]
            .as_array()
            .map(|t| t.iter().filter(|x| !x["verdict"].is_null()).count())
            .unwrap_or(0);
        judged.push(n);
    }
    assert_eq!(
        kinds,
        [
            "evaluation:queued",
            "evaluation:started",
            "evaluation:progress",
            "evaluation:progress",
            "evaluation:progress",
            "evaluation:completed"
        ]
    );
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    assert_eq!(judged, [0, 0, 1, 2, 3, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compile_cache_hits_and_evicts() {
    // 1 MiB for the cache; each program below carries ~600 KB of data.
    let s = Server::start("[judge]\ncompile_cache_mb = 1\nbuild_mb = 1").await;
    let big = |n: u32| {
        format!("#include <stdio.h>\nstatic char big[600000] = {{{n}}};\nint main(int argc,char**argv){{printf(\"%d\\n\", big[argc-1]);return 0;}}\n")
    };
    let body = |n: u32| json!({"language": "c", "code": big(n), "tests": [{"expected_output": n.to_string()}]});
    let first = judged(&s, body(1)).await;
    assert_eq!(first["verdict"], "accepted", "{first:#}");
    assert_eq!(first["compile"]["cached"], false);
    let again = judged(&s, body(1)).await;
    assert_eq!(again["compile"]["cached"], true, "{again:#}");
    assert_eq!(again["verdict"], "accepted");
    assert_eq!(
        s.metric("crucible_compilations_total", "outcome=\"ok\"")
            .await,
        Some(1.0),
        "no second compile"
    );
    assert_eq!(
        s.metric("crucible_compile_cache_hits_total", "").await,
        Some(1.0)
    );
    // Two more programs push the first out (least recently used).
    assert_eq!(judged(&s, body(2)).await["compile"]["cached"], false);
    assert_eq!(judged(&s, body(3)).await["compile"]["cached"], false);
    assert!(s.metric("crucible_compile_cache_evictions_total", "").await >= Some(1.0));
    let evicted = judged(&s, body(1)).await;
    assert_eq!(evicted["compile"]["cached"], false, "{evicted:#}");
    assert_eq!(evicted["verdict"], "accepted");
    let h = s.health().await;
    assert!(
        h["judge"]["compile_cache_bytes"].as_u64() <= Some(1024 * 1024),
        "{h}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_planted_by_a_compile_step_are_never_followed() {
    // A secret on the host that only root may read.
    let secret_path = std::env::temp_dir().join(format!("crucible-secret-{}", std::process::id()));
    let secret = format!("TOPSECRET-{}", std::process::id());
    std::fs::write(&secret_path, &secret).expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // A language whose compile step runs the submitted shell script: it plants links to
    // host files in /build, a fifo, and one real file.
    let s = Server::start(
        "[languages.planted]\nfile = \"build.sh\"\ncompile = [\"sh\", \"{file}\"]\n\
         run = [\"sh\", \"-c\", \"ls -la /build; cat /build/real; cat /build/leak /build/leak2 /build/dir/leak3\"]\n\
         image = \"none\"\npackage = \"dash\"\n",
    )
    .await;
    let script = format!(
        "set -e\nln -s {p} /build/leak\nln -s /proc/1/root{p} /build/leak2\nmkdir /build/dir\n\
         ln -s /etc/shadow /build/dir/leak3\nmkfifo /build/fifo\nln -s / /build/root\necho real > /build/real\n",
        p = secret_path.display()
    );
    let r = judged(
        &s,
        json!({"language": "planted", "code": script, "tests": [{"expected_output": "real"}]}),
    )
    .await;
    assert_eq!(r["compile"]["exit_code"], 0, "{r:#}");
    let all = r.to_string();
    assert!(!all.contains(&secret), "the secret leaked: {r:#}");
    let out = r["tests"][0]["stdout"].as_str().unwrap_or("");
    assert!(out.contains("real"), "{r:#}");
    assert!(!out.contains("leak"), "links reached the run: {out}");
    // What the host kept: regular files and directories only.
    let node = s.health().await["node"].as_str().expect("node").to_string();
    let cache = std::env::temp_dir().join(format!("crucible-cache-{node}"));
    let mut seen = Vec::new();
    let mut stack = vec![cache.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("cache dir").flatten() {
            let t = e.file_type().expect("type");
            assert!(
                t.is_dir() || t.is_file(),
                "{} is neither a file nor a directory",
                e.path().display()
            );
            if t.is_dir() {
                stack.push(e.path());
            } else {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                assert!(
                    !text.contains(&secret),
                    "{} holds the secret",
                    e.path().display()
                );
                seen.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    assert!(seen.contains(&"real".to_string()), "{seen:?}");
    assert!(
        !seen.iter().any(|n| n.starts_with("leak") || n == "fifo"),
        "{seen:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&secret_path).expect("secret"),
        secret
    );
    let _ = std::fs::remove_file(&secret_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_judging_input_names_the_field() {
    let s = Server::start("[judge]\nmax_tests = 3\nmax_eval_secs = 10\nmax_files = 2").await;
    let base = || json!({"language": "c", "code": "int main(){return 0;}"});
    let with = |k: &str, v: Value| {
        let mut b = base();
        b[k] = v;
        b
    };
    let file = |n: &str| json!({"name": n, "content": "x"});
    for (body, status, code, field) in [
        (
            with("files", json!([file("../x")])),
            422,
            "invalid_field",
            "files[0].name",
        ),
        (
            with("files", json!([file("/etc/x")])),
            422,
            "invalid_field",
            "files[0].name",
        ),
        (
            with("files", json!([file("a//b")])),
            422,
            "invalid_field",
            "files[0].name",
        ),
        (
            with("files", json!([file(".hidden")])),
            422,
            "invalid_field",
            "files[0].name",
        ),
        (
            with("files", json!([file("a.h"), file("a.h")])),
            422,
            "invalid_field",
            "files[1].name",
        ),
        (
            with("files", json!([file("main.c")])),
            422,
            "invalid_field",
            "files[0].name",
        ),
        (
            with("files", json!([file("a"), file("b"), file("c")])),
            422,
            "invalid_field",
            "files",
        ),
        (
            with("files", json!([{"name": "a"}])),
            422,
            "invalid_field",
            "files[0].content",
        ),
        (with("files", json!("x")), 422, "invalid_field", "files"),
        (
            with("tests", json!([{}, {}, {}, {}])),
            422,
            "invalid_field",
            "tests",
        ),
        (
            with("tests", json!([{"timeout": 6}, {"timeout": 6}])),
            422,
            "limit_too_high",
            "tests",
        ),
        (
            with("tests", json!([{"stdin": 1}])),
            422,
            "invalid_field",
            "tests[0].stdin",
        ),
        (
            with("tests", json!([{"expect": "x"}])),
            422,
            "invalid_field",
            "tests[0].expect",
        ),
        (
            with("tests", json!([{"timeout": -1}])),
            422,
            "invalid_field",
            "tests[0].timeout",
        ),
        (
            with("compare", json!("fuzzy")),
            422,
            "invalid_field",
            "compare",
        ),
        (
            with("float_tolerance", json!(-1)),
            422,
            "invalid_field",
            "float_tolerance",
        ),
        (
            with("stop_on_failure", json!("yes")),
            422,
            "invalid_field",
            "stop_on_failure",
        ),
        (with("args", json!([1])), 422, "invalid_field", "args[0]"),
    ] {
        let head = s.health().await["store"]["head_seq"].clone();
        let r = s.post("/api/eval", &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let e = r.json().expect("json");
        assert_eq!(e["error"]["code"], code, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{body}: {e}");
        assert_eq!(
            s.health().await["store"]["head_seq"],
            head,
            "{body} changed something"
        );
    }
    // In a batch, the item's position prefixes the field.
    let r = s
        .post(
            "/api/eval-batch",
            &json!({"evaluations": [base(), with("compare", json!(1))]}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json().expect("json")["error"]["field"],
        "evaluations[1].compare"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn languages_lists_every_language_with_its_version() {
    let s = Server::start("[languages.cobol]\nrun = [\"cobc-not-installed\", \"{file}\"]\nfile = \"main.cob\"\npackage = \"gnucobol\"\n").await;
    let started = Instant::now();
    loop {
        let v = s.get("/api/languages").await.json().expect("json");
        let langs = v["languages"].as_array().expect("languages").clone();
        let names: Vec<&str> = langs.iter().filter_map(|l| l["name"].as_str()).collect();
        for n in [
            "c",
            "cpp",
            "go",
            "java",
            "javascript",
            "python",
            "rust",
            "sh",
            "cobol",
        ] {
            assert!(names.contains(&n), "{n} missing: {names:?}");
        }
        let cobol = langs.iter().find(|l| l["name"] == "cobol").expect("cobol");
        assert_eq!(cobol["available"], false);
        assert!(cobol["reason"].as_str().unwrap_or("").contains("gnucobol"));
        let c = langs.iter().find(|l| l["name"] == "c").expect("c");
        assert_eq!(c["compiled"], true);
        assert_eq!(c["file"], "main.c");
        assert_eq!(c["limits"]["memory_mb"], 256);
        let java = langs.iter().find(|l| l["name"] == "java").expect("java");
        assert_eq!(java["limits"]["memory_mb"], 512, "the JVM's own default");
        if langs
            .iter()
            .filter(|l| l["available"] == true)
            .all(|l| l["version"].is_string())
        {
            let py = langs
                .iter()
                .find(|l| l["name"] == "python")
                .expect("python");
            assert!(
                py["version"].as_str().unwrap_or("").contains("Python 3"),
                "{py}"
            );
            break;
        }
        assert!(started.elapsed() < DEADLINE, "versions never appeared: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A compile step (Python) that forges a whole build frame and writes it into the stream
/// the host reads (its parent's stdout, and that of the sandbox's or container's first
/// process), its tar holding what a hostile archive holds: a link to a host directory and
/// a file through it, `..` names and an absolute name, each aimed at `victim`.
pub fn forging_compile_step(victim: &std::path::Path) -> String {
    format!(
        r#"import io, os, tarfile
victim = {victim:?}
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
    s = tarfile.TarInfo("esc"); s.type = tarfile.SYMTYPE; s.linkname = victim; t.addfile(s)
    h = tarfile.TarInfo("hard"); h.type = tarfile.LNKTYPE; h.linkname = victim + "/hardlinked"; t.addfile(h)
    for name in ["esc/through-link", "../../../../../../.." + victim + "/dotdot", victim + "/absolute", "real"]:
        data = b"real\n" if name == "real" else b"PWNED"
        i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))
tar = buf.getvalue()
frame = b"CRUCIBLE-BUILD 1\nstatus exited 0\nstdout 0\nstderr 0\ntar %d\n" % len(tar) + tar
for path in ["/proc/%d/fd/1" % os.getppid(), "/proc/1/fd/1"]:
    try:
        with open(path, "wb") as f:
            f.write(frame)
        print("forged into", path)
    except OSError as e:
        print("cannot write", path, e)
open("/build/real", "w").write("real\n")
"#
    )
}

/// Submit the forging compile step as language `forge` and check nothing was written
/// outside the build: `victim` (a host directory) stays empty.
pub async fn assert_a_forged_build_writes_nothing_outside(s: &Server, victim: &std::path::Path) {
    let r = judged(
        s,
        json!({"language": "forge", "code": forging_compile_step(victim), "tests": [{"expected_output": "real"}]}),
    )
    .await;
    let left: Vec<_> = std::fs::read_dir(victim)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "written outside the build: {left:?}\n{r:#}"
    );
    assert!(
        matches!(r["status"].as_str(), Some("completed" | "failed")),
        "{r:#}"
    );
    let fine = s.run_py("print(1)", 30.0).await;
    assert_eq!(fine["status"], "completed", "{fine:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_build_archive_writes_nothing_outside_the_build() {
    // CVE-2024-28185's shape: writes through a link or a name the host follows.
    let victim = tempfile::tempdir().expect("victim dir");
    let s = Server::start(
        "[languages.forge]\nfile = \"forge.py\"\ncompile = [\"python3\", \"{file}\"]\n\
         run = [\"sh\", \"-c\", \"cat /build/real\"]\nimage = \"none\"\npackage = \"python3\"\n",
    )
    .await;
    assert_a_forged_build_writes_nothing_outside(&s, victim.path()).await;
}
