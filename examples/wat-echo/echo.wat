;; An echo handler written by hand in the component model's text format:
;; two core instances (one holding the memory and the allocator the host
;; writes read data through, one with the handler's code), against three
;; for the Rust echo built by wit-component (and more for the C, JavaScript
;; and Python ones, which link in more modules).
(component $echo
  (import "wasi:io/error@0.2.12" (instance $error-instance
    (export "error" (type (sub resource)))))
  (alias export $error-instance "error" (type $error))
  (import "wasi:io/poll@0.2.12" (instance $poll-instance
    (export "pollable" (type $pollable (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow $pollable))))))
  (alias export $poll-instance "pollable" (type $pollable))
  (import "wasi:io/streams@0.2.12" (instance $streams
    (alias outer $echo $error (type $error-outer))
    (export "error" (type $error (eq $error-outer)))
    (alias outer $echo $pollable (type $pollable-outer))
    (export "pollable" (type $pollable (eq $pollable-outer)))
    (type $stream-error-def (variant
      (case "last-operation-failed" (own $error))
      (case "closed")))
    (export "stream-error" (type $stream-error (eq $stream-error-def)))
    (export "input-stream" (type $input-stream (sub resource)))
    (export "output-stream" (type $output-stream (sub resource)))
    (export "[method]input-stream.blocking-read" (func
      (param "self" (borrow $input-stream)) (param "len" u64)
      (result (result (list u8) (error $stream-error)))))
    (export "[method]output-stream.check-write" (func
      (param "self" (borrow $output-stream))
      (result (result u64 (error $stream-error)))))
    (export "[method]output-stream.write" (func
      (param "self" (borrow $output-stream)) (param "contents" (list u8))
      (result (result (error $stream-error)))))
    (export "[method]output-stream.blocking-write-and-flush" (func
      (param "self" (borrow $output-stream)) (param "contents" (list u8))
      (result (result (error $stream-error)))))
    (export "[method]output-stream.blocking-flush" (func
      (param "self" (borrow $output-stream))
      (result (result (error $stream-error)))))
    (export "[method]output-stream.subscribe" (func
      (param "self" (borrow $output-stream)) (result (own $pollable))))))
  (alias export $streams "input-stream" (type $input-stream))
  (alias export $streams "output-stream" (type $output-stream))
  (import "sockserver:handler/types@0.1.0" (instance $types
    (export "connection" (type (sub resource)))))
  (alias export $types "connection" (type $connection))

  ;; The memory, and an allocator for the host's one allocation per read:
  ;; every read lands in the same 64 KiB buffer, which the handler has
  ;; written back before it reads again.
  (core module $memory
    (memory (export "memory") 2)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      i32.const 65536)
    (data (i32.const 64) "stream error"))
  (core instance $memory (instantiate $memory))

  (core func $blocking-read (canon lower
    (func $streams "[method]input-stream.blocking-read")
    (memory (core memory $memory "memory"))
    (realloc (core func $memory "realloc"))))
  (core func $check-write (canon lower
    (func $streams "[method]output-stream.check-write")
    (memory (core memory $memory "memory"))))
  (core func $write (canon lower
    (func $streams "[method]output-stream.write")
    (memory (core memory $memory "memory"))))
  (core func $blocking-write-and-flush (canon lower
    (func $streams "[method]output-stream.blocking-write-and-flush")
    (memory (core memory $memory "memory"))))
  (core func $blocking-flush (canon lower
    (func $streams "[method]output-stream.blocking-flush")
    (memory (core memory $memory "memory"))))
  (core func $subscribe (canon lower (func $streams "[method]output-stream.subscribe")))
  (core func $block (canon lower (func $poll-instance "[method]pollable.block")))
  (core func $drop-pollable (canon resource.drop $pollable))
  (core func $drop-error (canon resource.drop $error))
  (core instance $host
    (export "memory" (memory $memory "memory"))
    (export "blocking-read" (func $blocking-read))
    (export "check-write" (func $check-write))
    (export "write" (func $write))
    (export "blocking-write-and-flush" (func $blocking-write-and-flush))
    (export "blocking-flush" (func $blocking-flush))
    (export "subscribe" (func $subscribe))
    (export "block" (func $block))
    (export "drop-pollable" (func $drop-pollable))
    (export "drop-error" (func $drop-error)))

  (core module $handler
    (import "host" "memory" (memory 1))
    (import "host" "blocking-read" (func $blocking-read (param i32 i64 i32)))
    (import "host" "check-write" (func $check-write (param i32 i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "blocking-write-and-flush" (func $blocking-write-and-flush (param i32 i32 i32 i32)))
    (import "host" "blocking-flush" (func $blocking-flush (param i32 i32)))
    (import "host" "subscribe" (func $subscribe (param i32) (result i32)))
    (import "host" "block" (func $block (param i32)))
    (import "host" "drop-pollable" (func $drop-pollable (param i32)))
    (import "host" "drop-error" (func $drop-error (param i32)))

    ;; Results land at offset 0 (a result<_, stream-error> or a
    ;; result<list<u8>, stream-error>: tag at 0, payload at 4) or at 16
    ;; (check-write's result<u64, stream-error>: tag at 16, payload at
    ;; 24). `handle`'s own result is at 32.

    ;; Whether the call whose result is at `at` failed. A failure that
    ;; carries an error resource drops it.
    (func $failed (param $at i32) (param $payload i32) (result i32)
      (if (i32.eqz (i32.load8_u (local.get $at)))
        (then (return (i32.const 0))))
      (if (i32.eqz (i32.load8_u (local.get $payload)))
        (then (call $drop-error (i32.load (i32.add (local.get $payload) (i32.const 4))))))
      i32.const 1)

    ;; Write `len` bytes at `ptr` and flush; 1 if the stream failed.
    (func $send (param $out i32) (param $ptr i32) (param $len i32) (result i32)
      (local $n i32) (local $pollable i32)
      (if (i32.le_u (local.get $len) (i32.const 4096))
        (then
          (call $blocking-write-and-flush (local.get $out) (local.get $ptr) (local.get $len) (i32.const 0))
          (return (call $failed (i32.const 0) (i32.const 4)))))
      (block $done
        (loop $more
          (br_if $done (i32.eqz (local.get $len)))
          (call $check-write (local.get $out) (i32.const 16))
          (if (call $failed (i32.const 16) (i32.const 24)) (then (return (i32.const 1))))
          ;; The permit is a u64; the buffer is 64 KiB.
          (local.set $n (i32.wrap_i64 (i64.load (i32.const 24))))
          (if (i64.gt_u (i64.load (i32.const 24)) (i64.extend_i32_u (local.get $len)))
            (then (local.set $n (local.get $len))))
          (if (i32.eqz (local.get $n))
            (then
              (local.set $pollable (call $subscribe (local.get $out)))
              (call $block (local.get $pollable))
              (call $drop-pollable (local.get $pollable))
              (br $more)))
          (call $write (local.get $out) (local.get $ptr) (local.get $n) (i32.const 0))
          (if (call $failed (i32.const 0) (i32.const 4)) (then (return (i32.const 1))))
          (local.set $ptr (i32.add (local.get $ptr) (local.get $n)))
          (local.set $len (i32.sub (local.get $len) (local.get $n)))
          (br $more)))
      (call $blocking-flush (local.get $out) (i32.const 0))
      (call $failed (i32.const 0) (i32.const 4)))

    (func (export "handle") (param $conn i32) (param $in i32) (param $out i32) (result i32)
      (block $error
        (loop $next
          (call $blocking-read (local.get $in) (i64.const 65536) (i32.const 0))
          (if (i32.load8_u (i32.const 0))
            (then
              ;; `closed`: the client half-closed; ok (zeroes at 48).
              (if (i32.eq (i32.load8_u (i32.const 4)) (i32.const 1))
                (then (return (i32.const 48))))
              (call $drop-error (i32.load (i32.const 8)))
              (br $error)))
          (br_if $error (call $send (local.get $out) (i32.load (i32.const 4)) (i32.load (i32.const 8))))
          (br $next)))
      ;; err("stream error")
      (i32.store8 (i32.const 32) (i32.const 1))
      (i32.store (i32.const 36) (i32.const 64))
      (i32.store (i32.const 40) (i32.const 12))
      i32.const 32))
  (core instance $handler (instantiate $handler (with "host" (instance $host))))

  (func $handle
    (param "conn" (own $connection))
    (param "input" (own $input-stream))
    (param "output" (own $output-stream))
    (result (result (error string)))
    (canon lift (core func $handler "handle") (memory (core memory $memory "memory"))))
  (instance $exports (export "handle" (func $handle)))
  (export "sockserver:handler/handler@0.1.0" (instance $exports)))
